"""The Helm chart's values, as a pydantic model: charts/kubetune/values.schema.json is generated from it
(`python -m kubetune_operator.generate`, `make generate`).

charts/kubetune/values.yaml stays written by hand, since its comments are the chart's documentation;
tests/test_chart.py checks that it validates against the schema and that every key in it is here. Every
object is closed (an unknown key, a typo, fails `helm install`), except the Kubernetes affinity terms.
Fields without a default are required; `OPTIONAL` ones may be left out (values.yaml sets them all).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Fields that may be left out. The default is never rendered: values.yaml holds the defaults.
OPTIONAL: Any = None

DNS_LABEL = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"
DNS_SUBDOMAIN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$"
# The Prometheus Operator's Duration (monitoring.coreos.com/v1), e.g. 30s, 1m30s.
PROMETHEUS_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)

Port = Annotated[int, Field(ge=1, le=65535)]
NonEmpty = Annotated[str, Field(min_length=1)]
StringMap = dict[str, str]


class _Values(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class Crds(_Values):
    enabled: bool
    """Install and upgrade the FineTuneJob CRD with the release (kept on uninstall)."""


class Image(_Values):
    repository: NonEmpty
    """Operator image repository."""
    tag: str = OPTIONAL
    """Image tag; empty: the chart's appVersion."""
    digest: Annotated[str, Field(pattern=r"^(sha256:[a-f0-9]{64})?$")] = OPTIONAL
    """Image digest; wins over the tag."""
    pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(alias="pullPolicy")


class LocalObjectReference(_Values):
    name: NonEmpty


class LeaderElection(_Values):
    enabled: bool
    """Elect a leader on the kubetune-operator Lease."""


class ServiceAccount(_Values):
    create: bool
    name: Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)] = OPTIONAL
    annotations: StringMap = OPTIONAL
    """Annotations on the ServiceAccount."""


class Health(_Values):
    port: Port
    """Port of /healthz and /readyz."""


class MetricsService(_Values):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = OPTIONAL
    port: Port = OPTIONAL
    """Service port."""
    annotations: StringMap = OPTIONAL
    """Annotations on the metrics Service."""


class ServiceMonitor(_Values):
    enabled: bool
    """Create a Prometheus Operator ServiceMonitor (monitoring.coreos.com/v1) for the metrics Service."""
    interval: Annotated[str, Field(min_length=1, pattern=PROMETHEUS_DURATION)] = OPTIONAL
    """Scrape interval, e.g. 30s."""
    scrape_timeout: Annotated[str, Field(pattern=PROMETHEUS_DURATION)] = Field(
        OPTIONAL, alias="scrapeTimeout"
    )
    """Scrape timeout; empty: Prometheus' default."""
    labels: StringMap = OPTIONAL
    """Extra labels on the ServiceMonitor (for the Prometheus serviceMonitorSelector)."""


class Metrics(_Values):
    enabled: bool
    """Serve /metrics and create a Service for it."""
    port: Port = OPTIONAL
    """Container port of /metrics."""
    service: MetricsService = OPTIONAL
    service_monitor: ServiceMonitor = Field(OPTIONAL, alias="serviceMonitor")


Quantity = str | float


class ResourceClaim(_Values):
    name: str
    request: str = OPTIONAL


class Resources(_Values):
    """Container resources (core/v1 ResourceRequirements)."""

    limits: dict[str, Quantity] = OPTIONAL
    requests: dict[str, Quantity] = OPTIONAL
    claims: list[ResourceClaim] = OPTIONAL


class Toleration(_Values):
    key: str = OPTIONAL
    operator: Literal["Exists", "Equal"] = OPTIONAL
    value: str = OPTIONAL
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = OPTIONAL
    toleration_seconds: int = Field(OPTIONAL, alias="tolerationSeconds")


class Affinity(_Values):
    """core/v1 Affinity."""

    # The terms themselves are Kubernetes' own, passed through as they are.
    node_affinity: dict[str, Any] = Field(OPTIONAL, alias="nodeAffinity")
    pod_affinity: dict[str, Any] = Field(OPTIONAL, alias="podAffinity")
    pod_anti_affinity: dict[str, Any] = Field(OPTIONAL, alias="podAntiAffinity")


class SeccompProfile(_Values):
    """Unconfined is not allowed."""

    type: Literal["RuntimeDefault", "Localhost"]
    localhost_profile: str = Field(OPTIONAL, alias="localhostProfile")


class AppArmorProfile(_Values):
    type: Literal["RuntimeDefault", "Localhost"]
    localhost_profile: str = Field(OPTIONAL, alias="localhostProfile")


class SELinuxOptions(_Values):
    level: str = OPTIONAL
    role: str = OPTIONAL
    type: str = OPTIONAL
    user: str = OPTIONAL


class Sysctl(_Values):
    name: str
    value: str


class PodSecurityContext(_Values):
    """core/v1 PodSecurityContext; runAsNonRoot and seccomp are enforced."""

    run_as_non_root: Literal[True] = Field(alias="runAsNonRoot")
    """Must stay true."""
    run_as_user: Annotated[int, Field(ge=1)] = Field(OPTIONAL, alias="runAsUser")
    """Must not be 0."""
    run_as_group: Annotated[int, Field(ge=0)] = Field(OPTIONAL, alias="runAsGroup")
    fs_group: Annotated[int, Field(ge=0)] = Field(OPTIONAL, alias="fsGroup")
    fs_group_change_policy: Literal["Always", "OnRootMismatch"] = Field(OPTIONAL, alias="fsGroupChangePolicy")
    supplemental_groups: list[Annotated[int, Field(ge=0)]] = Field(OPTIONAL, alias="supplementalGroups")
    supplemental_groups_policy: Literal["Merge", "Strict"] = Field(OPTIONAL, alias="supplementalGroupsPolicy")
    seccomp_profile: SeccompProfile = Field(alias="seccompProfile")
    app_armor_profile: AppArmorProfile = Field(OPTIONAL, alias="appArmorProfile")
    se_linux_options: SELinuxOptions = Field(OPTIONAL, alias="seLinuxOptions")
    se_linux_change_policy: Literal["MountOption", "Recursive"] = Field(OPTIONAL, alias="seLinuxChangePolicy")
    sysctls: list[Sysctl] = OPTIONAL


def _drops_all(drop: list[str]) -> list[str]:
    if "ALL" not in drop:
        raise ValueError("must include ALL")
    return drop


class Capabilities(_Values):
    # The schema says it with `contains`, the model with a validator.
    drop: Annotated[list[str], AfterValidator(_drops_all)] = Field(
        json_schema_extra={"contains": {"const": "ALL"}}
    )
    """Must include ALL."""
    add: list[Any] = Field(OPTIONAL, max_length=0)
    """The operator needs no capability."""


class SecurityContext(_Values):
    """core/v1 SecurityContext of the operator container; hardening is enforced."""

    allow_privilege_escalation: Literal[False] = Field(alias="allowPrivilegeEscalation")
    """Must stay false."""
    privileged: Literal[False] = OPTIONAL
    """Must stay false."""
    capabilities: Capabilities
    read_only_root_filesystem: bool = Field(OPTIONAL, alias="readOnlyRootFilesystem")
    run_as_non_root: Literal[True] = Field(OPTIONAL, alias="runAsNonRoot")
    """Must stay true."""
    run_as_user: Annotated[int, Field(ge=1)] = Field(OPTIONAL, alias="runAsUser")
    """Must not be 0."""
    run_as_group: Annotated[int, Field(ge=0)] = Field(OPTIONAL, alias="runAsGroup")
    seccomp_profile: SeccompProfile = Field(OPTIONAL, alias="seccompProfile")
    app_armor_profile: AppArmorProfile = Field(OPTIONAL, alias="appArmorProfile")
    se_linux_options: SELinuxOptions = Field(OPTIONAL, alias="seLinuxOptions")
    proc_mount: Literal["Default"] = Field(OPTIONAL, alias="procMount")


class SecretPreCheck(_Values):
    enabled: bool
    """Grant get on secrets and check that the Hub token Secret exists (metadata only) before a run
    starts."""


PolicyList = list[NonEmpty]


class Policy(_Values):
    create: bool
    """Create the policy ConfigMap <fullname>-policy from these values."""
    allowed_image_prefixes: PolicyList = Field(OPTIONAL, alias="allowedImagePrefixes")
    """Prefixes spec.image must start with; empty: any image."""
    max_gpus_per_job: Annotated[int, Field(ge=0, le=999999999)] | None = Field(
        OPTIONAL, alias="maxGPUsPerJob"
    )
    """Most GPUs per FineTuneJob (gpusPerNode x nodes); null: no limit."""
    allowed_priority_classes: PolicyList = Field(OPTIONAL, alias="allowedPriorityClasses")
    """PriorityClasses a FineTuneJob may name; empty: any."""
    allowed_toleration_keys: PolicyList = Field(OPTIONAL, alias="allowedTolerationKeys")
    """Taint keys a FineTuneJob may tolerate; empty: any."""
    allowed_node_selector_keys: PolicyList = Field(OPTIONAL, alias="allowedNodeSelectorKeys")
    """Node label keys a FineTuneJob may select on; empty: any."""


class AdmissionPolicy(_Values):
    enabled: bool
    """Install the ValidatingAdmissionPolicies and their bindings."""
    validation_actions: list[Literal["Deny", "Warn", "Audit"]] = Field(
        alias="validationActions", min_length=1, json_schema_extra={"uniqueItems": True}
    )
    """What a violation does; Deny and Warn exclude each other."""
    parameter_not_found_action: Literal["Deny", "Allow"] = Field(alias="parameterNotFoundAction")
    """When the policy ConfigMap is missing: Deny (safe) or Allow."""


class AggregatedRoles(_Values):
    enabled: bool
    """Create <fullname>-edit and <fullname>-view, aggregated into edit/admin and view."""


class Values(_Values):
    """Every key is documented in values.yaml; unknown keys are errors at every level."""

    name_override: str = Field(OPTIONAL, alias="nameOverride")
    """Replaces the chart name in object names."""
    fullname_override: str = Field(OPTIONAL, alias="fullnameOverride")
    """Replaces the whole name prefix of every object."""
    crds: Crds
    image: Image
    image_pull_secrets: list[LocalObjectReference] = Field(OPTIONAL, alias="imagePullSecrets")
    replica_count: Annotated[int, Field(ge=0)] = Field(alias="replicaCount")
    """Operator replicas; more than one needs leaderElection.enabled."""
    leader_election: LeaderElection = Field(alias="leaderElection")
    workers: Annotated[int, Field(ge=1)]
    """FineTuneJobs reconciled in parallel."""
    watch_namespace: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)] = Field(
        OPTIONAL, alias="watchNamespace"
    )
    """Watch one namespace only; empty: all."""
    log_format: Literal["json", "text"] = Field(alias="logFormat")
    trainer_image: str = Field(OPTIONAL, alias="trainerImage")
    """Trainer image for FineTuneJobs that name none; empty: the operator's default."""
    image_pull_grace_seconds: Annotated[int, Field(ge=0)] = Field(alias="imagePullGraceSeconds")
    """Seconds an image may fail to pull before the run fails (ImagePullFailed)."""
    service_account: ServiceAccount = Field(alias="serviceAccount")
    health: Health
    metrics: Metrics
    resources: Resources = OPTIONAL
    pod_annotations: StringMap = Field(OPTIONAL, alias="podAnnotations")
    """Extra annotations on the operator's pods."""
    pod_labels: StringMap = Field(OPTIONAL, alias="podLabels")
    """Extra labels on the operator's pods."""
    node_selector: StringMap = Field(OPTIONAL, alias="nodeSelector")
    """Node labels the operator's pods must match."""
    tolerations: list[Toleration] = OPTIONAL
    affinity: Affinity = OPTIONAL
    priority_class_name: str = Field(OPTIONAL, alias="priorityClassName")
    pod_security_context: PodSecurityContext = Field(alias="podSecurityContext")
    security_context: SecurityContext = Field(alias="securityContext")
    secret_pre_check: SecretPreCheck = Field(alias="secretPreCheck")
    policy: Policy
    admission_policy: AdmissionPolicy = Field(alias="admissionPolicy")
    aggregated_roles: AggregatedRoles = Field(alias="aggregatedRoles")


# ---------------------------------------------------------------------------------------------------
# The JSON schema Helm reads: draft-07, self-contained, no titles or defaults
# ---------------------------------------------------------------------------------------------------

SCHEMA_PATH = "charts/kubetune/values.schema.json"
_ORDER = (
    "type",
    "const",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "uniqueItems",
    "items",
    "contains",
    "additionalProperties",
    "properties",
    "required",
    "description",
)


def _clean(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_clean(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    node = {k: v for k, v in node.items() if k not in ("title", "default", "$defs")}
    if node.get("additionalProperties") is True:  # an open map, e.g. Kubernetes' own terms
        del node["additionalProperties"]
    if "anyOf" in node:
        # X | None, or a union of plain types: one node with a list of types (JSON schema's own way).
        options = [_clean(o, defs) for o in node.pop("anyOf")]
        types = [o.pop("type") for o in options]
        merged: dict[str, Any] = {}
        for o in options:
            merged.update(o)
        node = {**merged, **node, "type": types}
    if "description" in node:
        node["description"] = " ".join(node["description"].split())
    out = {k: _clean(v, defs) if k != "properties" else v for k, v in node.items()}
    if "properties" in out:
        out["properties"] = {k: _clean(v, defs) for k, v in out["properties"].items()}
    rank = {k: i for i, k in enumerate(_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def values_schema() -> dict[str, Any]:
    raw = Values.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _clean(raw, raw.get("$defs", {}))
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the kubetune chart",
        **schema,
    }


def render_values_schema() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"
