"""The Helm chart (charts/kubetune) and the kustomize base (manifests/base), without a cluster.

`helm lint --strict` and `helm template` with the real helm, built from the Go module proxy by
hack/helm/build.sh (once, about a minute; cached beside the e2e control plane), and `kubectl kustomize`
with the test control plane's kubectl. Without Go these tests FAIL, loudly; KUBETUNE_SKIP_E2E=1 skips the
ones that need helm or kubectl instead. What the chart grants is operator/src/kubetune_operator/rbac.py's,
which is checked here against every Kubernetes API call in operator/src/kubetune_operator/.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes import client

from kubetune.api.v1alpha1 import GROUP, PLURAL
from kubetune.policy import KEYS, Limits, admission_policies, load
from kubetune_operator import rbac
from kubetune_operator.values import Values

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetune"
CRD = ROOT / "manifests" / "crd" / "kubetune.io_finetunejobs.yaml"
# helm renders the CRD from a file inside the chart (a chart reads no file outside its folder): a copy of
# the generated CRD, byte for byte. kustomize needs none (manifests/base lists ../crd).
CRD_COPIES = (CHART / "files" / "crds" / "kubetune.io_finetunejobs.yaml",)
BASE = ROOT / "manifests" / "base"
SINGLE_NAMESPACE = ROOT / "manifests" / "overlays" / "single-namespace"
BUILD_HELM = ROOT / "hack" / "helm" / "build.sh"
OPERATOR_SRC = ROOT / "operator" / "src" / "kubetune_operator"
SKIP = os.environ.get("KUBETUNE_SKIP_E2E") == "1"
RELEASE, RELEASE_NS = "kubetune", "kubetune-system"

Rule = tuple[str, str, str, str]  # apiGroup, resource, verb, resourceName ("" = any)

# The grants of rbac.py, by role (tests/e2e/test_install.py checks them on a real API server).
# OPERATOR_RULES is what the chart grants where the operator reconciles, with secretPreCheck on.
OPERATOR_RULES: frozenset[Rule] = frozenset(rbac.grants(rbac.OPERATOR, rbac.SECRET_PRECHECK))
# The one grant secretPreCheck.enabled=false takes away (the metadata-only GET before a run starts).
SECRET_PRECHECK_RULES: frozenset[Rule] = frozenset(rbac.grants(rbac.SECRET_PRECHECK))
LEASE = "kubetune-operator"
# The policy ConfigMap (kubetune.policy): listed and watched by name in the release namespace.
POLICY_CONFIGMAP = "kubetune-policy"
POLICY_RULES: frozenset[Rule] = frozenset(
    (g, r, v, POLICY_CONFIGMAP if n == rbac.POLICY_CONFIGMAP else n)
    for g, r, v, n in rbac.grants(rbac.POLICY_READER)
)
LEADER_ELECTION_RULES: frozenset[Rule] = frozenset(rbac.grants(rbac.LEADER_ELECTION))

# The roles for people who create FineTuneJobs, aggregated into the built-in edit/admin and view roles.
USER_EDIT_RULES: frozenset[Rule] = frozenset(
    ("kubetune.io", "finetunejobs", verb, "")
    for verb in ("create", "update", "patch", "delete", "get", "list", "watch")
)
USER_VIEW_RULES: frozenset[Rule] = frozenset(
    ("kubetune.io", resource, verb, "")
    for resource in ("finetunejobs", "finetunejobs/status")
    for verb in ("get", "list", "watch")
)
AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def expand(rules: Iterable[dict[str, Any]]) -> set[Rule]:
    """RBAC rules as one (group, resource, verb, resourceName) tuple per grant."""
    out: set[Rule] = set()
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [""]:
                        out.add((group, resource, verb, name))
    return out


# ---------------------------------------------------------------------------------------------------
# helm
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helm]:
    if SKIP:
        pytest.skip("KUBETUNE_SKIP_E2E=1: helm is not built")
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_HELM)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hack/helm/build.sh timed out: {e}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            "cannot build helm with hack/helm/build.sh (it needs Go >= 1.26 and the Go module proxy; "
            f"set KUBETUNE_SKIP_E2E=1 to skip):\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    yield Helm(Path(proc.stdout.strip().splitlines()[-1]), tmp_path_factory.mktemp("helm-home"))


class Helm:
    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        # Keep helm's cache, config and data out of the user's home.
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
            check=False,
        )

    def template(self, *args: str) -> list[dict[str, Any]]:
        proc = self.run("template", RELEASE, str(CHART), f"--namespace={RELEASE_NS}", *args)
        assert proc.returncode == 0, proc.stderr
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    def template_fails(self, *args: str) -> str:
        proc = self.run("template", RELEASE, str(CHART), f"--namespace={RELEASE_NS}", *args)
        assert proc.returncode != 0, f"helm template {' '.join(args)} rendered:\n{proc.stdout[:2000]}"
        return proc.stderr


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [c] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def flag(c: dict[str, Any], name: str) -> str | None:
    """The value of `--name=value` (or "" for a bare `--name`) in the container's args."""
    for arg in c["args"]:
        if arg == f"--{name}":
            return ""
        if arg.startswith(f"--{name}="):
            return str(arg.split("=", 1)[1])
    return None


# ---------------------------------------------------------------------------------------------------
# The CRD: one source, copies kept in sync
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("copy", CRD_COPIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_crd_copies_match_the_generated_crd(copy: Path) -> None:
    assert copy.read_bytes() == CRD.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from {CRD.relative_to(ROOT)}: run `make generate`"
    )


def test_rendered_crd_is_the_generated_one_kept_on_uninstall(helm: Helm) -> None:
    crd = one(helm.template(), "CustomResourceDefinition")
    assert crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    generated = yaml.safe_load(CRD.read_text())
    # JSON with sorted keys: 1 and 1.0 (or True) would compare equal in Python, not here.
    assert json.dumps(crd, sort_keys=True) == json.dumps(generated, sort_keys=True)

    off = helm.template("--set", "crds.enabled=false")
    assert "CustomResourceDefinition" not in {d["kind"] for d in off}


# ---------------------------------------------------------------------------------------------------
# helm lint, and what renders
# ---------------------------------------------------------------------------------------------------

VARIANTS = {
    "defaults": [],
    "leader-election": ["--set", "replicaCount=3", "--set", "leaderElection.enabled=true"],
    "metrics": ["--set", "metrics.enabled=true"],
    "service-monitor": ["--set", "metrics.enabled=true,metrics.serviceMonitor.enabled=true"],
    "watch-namespace": ["--set", "watchNamespace=ml-team"],
    "no-secret-precheck": ["--set", "secretPreCheck.enabled=false"],
    "no-crds-existing-sa": ["--set", "crds.enabled=false,serviceAccount.create=false,serviceAccount.name=op"],
    "limits": [
        "--set",
        "policy.maxGPUsPerJob=8",
        "--set-json",
        'policy.allowedImagePrefixes=["r.example/ml/"]',
    ],
    "no-policy-objects": [
        "--set",
        "admissionPolicy.enabled=false,policy.create=false,aggregatedRoles.enabled=false",
    ],
}


@pytest.mark.parametrize("args", VARIANTS.values(), ids=VARIANTS.keys())
def test_helm_lint_strict(helm: Helm, args: list[str]) -> None:
    proc = helm.run("lint", "--strict", str(CHART), f"--namespace={RELEASE_NS}", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_defaults_render_the_operator_with_cluster_wide_rbac(helm: Helm) -> None:
    docs = helm.template()
    assert kinds(docs) == [
        ("ClusterRole", "kubetune"),
        ("ClusterRole", "kubetune-edit"),
        ("ClusterRole", "kubetune-view"),
        ("ClusterRoleBinding", "kubetune"),
        ("ConfigMap", "kubetune-policy"),
        ("CustomResourceDefinition", "finetunejobs.kubetune.io"),
        ("Deployment", "kubetune"),
        ("Role", "kubetune-policy-reader"),
        ("RoleBinding", "kubetune-policy-reader"),
        ("ServiceAccount", "kubetune"),
        ("ValidatingAdmissionPolicy", "kubetune-author-access"),
        ("ValidatingAdmissionPolicy", "kubetune-limits"),
        ("ValidatingAdmissionPolicyBinding", "kubetune-author-access"),
        ("ValidatingAdmissionPolicyBinding", "kubetune-limits"),
    ]
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubetune"
        if d["kind"] != "CustomResourceDefinition":  # the CRD's labels are the generated ones
            assert labels["app.kubernetes.io/instance"] == RELEASE
            assert labels["helm.sh/chart"] == "kubetune-0.1.0"
            if d["kind"] in ("ServiceAccount", "Deployment", "ConfigMap", "Role", "RoleBinding"):
                assert d["metadata"]["namespace"] == RELEASE_NS

    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # Without leader election, never two operators at once, not even during an upgrade.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == "kubetune"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    c = container(docs)
    assert c["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == ["kubetune-operator"]
    assert flag(c, "workers") == "4"
    assert flag(c, "log-format") == "json"
    assert flag(c, "health-addr") == "0.0.0.0:8080"
    assert flag(c, "image-pull-grace") == "300"
    assert flag(c, "policy-configmap") == f"{RELEASE_NS}/kubetune-policy"
    for absent in ("metrics-addr", "leader-elect", "namespace", "image"):
        assert flag(c, absent) is None, absent

    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "kubetune",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": RELEASE_NS}]


def test_probes_and_downward_api(helm: Helm) -> None:
    c = container(helm.template())
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}

    moved = container(helm.template("--set", "health.port=9440"))
    assert flag(moved, "health-addr") == "0.0.0.0:9440"
    assert {p["name"]: p["containerPort"] for p in moved["ports"]} == {"health": 9440}


def test_pod_security(helm: Helm) -> None:
    pod = one(helm.template(), "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    [c] = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # A read-only root needs somewhere to write temporary files.
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    [tmp] = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert "emptyDir" in tmp
    for risky in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(risky)
    assert all("hostPath" not in v for v in pod["volumes"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "securityContext.allowPrivilegeEscalation=true"], "allowPrivilegeEscalation"),
        (["--set", "securityContext.privileged=true"], "privileged"),
        (["--set", "podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
        (["--set", "securityContext.runAsNonRoot=false"], "runAsNonRoot"),
        (["--set-json", 'securityContext.capabilities.drop=["NET_RAW"]'], "ALL"),
        (["--set-json", 'securityContext.capabilities.add=["NET_ADMIN"]'], "capabilities/add"),
        (["--set", "podSecurityContext.seccompProfile.type=Unconfined"], "seccompProfile"),
        (["--set", "podSecurityContext.runAsUser=0"], "runAsUser"),
    ],
)
def test_schema_keeps_pod_security(helm: Helm, args: list[str], message: str) -> None:
    assert message in helm.template_fails(*args)


def test_operator_rules_are_exactly_the_calls_it_makes(helm: Helm) -> None:
    role = one(helm.template(), "ClusterRole", "kubetune")
    assert expand(role["rules"]) == OPERATOR_RULES


# ---------------------------------------------------------------------------------------------------
# Every API call the operator makes, as the RBAC grant it needs (from the client's own request paths)
# ---------------------------------------------------------------------------------------------------

Need = tuple[str, str, str]  # apiGroup, resource, verb
_HTTP_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def _needs(http: str, path: str) -> set[Need]:
    """The grants one request needs: `GET /apis/batch/v1/namespaces/{namespace}/jobs` is list on jobs.
    A list also needs watch: the operator lists to start a watch from (its informers: Kube.list_page,
    then Kube.watch)."""
    parts = path.strip("/").split("/")
    if len(parts) < 3:  # discovery (/api/, /apis/), which every client may read
        return set()
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if rest[:2] == ["namespaces", "{namespace}"] and len(rest) > 2:
        rest = rest[2:]
    if not rest or not rest[0]:  # discovery (/apis/batch/v1/), which every client may read
        return set()
    resource = "/".join([rest[0], *rest[2:3]])  # a subresource: pods/log, finetunejobs/status
    # The custom objects API: the operator's only custom resource is the FineTuneJob.
    group, resource = group.replace("{group}", GROUP), resource.replace("{plural}", PLURAL)
    named = len(rest) > 1
    if http in ("GET", "HEAD"):
        return (
            {(group, resource, "get")} if named else {(group, resource, "list"), (group, resource, "watch")}
        )
    if http == "DELETE":
        return {(group, resource, "delete" if named else "deletecollection")}
    return {(group, resource, _HTTP_VERBS.get(http, http.lower()))}


# The client's API classes (kubernetes.client imports them lazily: dir() lists them, vars() does not).
API_CLASSES = sorted(
    n for n in dir(client) if n.endswith("Api") and n != "ApiClient" and isinstance(getattr(client, n), type)
)
_SERIALIZE = re.compile(r"def _(\w+)_serialize\(.*?method='(\w+)',\s*resource_path='([^']+)'", re.DOTALL)


@functools.cache
def client_methods() -> dict[str, dict[str, set[Need]]]:
    """method name -> {API class name -> grants}, for every API class of the kubernetes client, read from
    the request each method makes (the generated `_<method>_serialize`)."""
    out: dict[str, dict[str, set[Need]]] = {}
    for cls_name in API_CLASSES:
        cls = getattr(client, cls_name)
        methods = _SERIALIZE.findall(Path(inspect.getfile(cls)).read_text())
        assert methods, f"{cls_name}: no request paths found in the generated client"
        for name, http, path in methods:
            if path.startswith(("/api/", "/apis/")) and hasattr(cls, name):
                out.setdefault(name, {})[cls_name] = _needs(http, path)
    return out


def _api_classes(tree: ast.AST) -> dict[str, str]:
    """`self.core = client.CoreV1Api(...)` (or `core = ...`): receiver name -> API class name."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            cls = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if cls in API_CLASSES:
                for target in node.targets:
                    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
                    if name:
                        out[name] = cls
    return out


def _names(node: ast.AST) -> set[str]:
    return {
        n.attr if isinstance(n, ast.Attribute) else n.id
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute | ast.Name)
    }


def _unreached(trees: list[ast.Module]) -> set[int]:
    """The nodes of methods of the API doors (classes that hold a client API object: Kube, LeaderElector)
    that no other code of the operator reaches, directly or through other such methods: their calls need
    no grant (a wrapper left over, or kept for tests, keeps no rule alive)."""
    doors: list[ast.FunctionDef] = []
    for tree in trees:
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and _api_classes(n)):
            doors += [f for f in cls.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")]
    inside = {id(n): f for f in doors for n in ast.walk(f)}
    names = {
        n.attr if isinstance(n, ast.Attribute) else n.id
        for tree in trees
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute | ast.Name) and id(n) not in inside
    }
    reached: set[int] = set()
    while True:
        more = [f for f in doors if id(f) not in reached and f.name in names]
        if not more:
            return {i for i, f in inside.items() if id(f) not in reached}
        for f in more:
            reached.add(id(f))
            names |= _names(f)


def operator_api_calls() -> dict[str, set[Need]]:
    """Every Kubernetes API method the operator's code names (called, or handed to a watch or a table),
    as `file:line method` -> the grants it needs."""
    calls: dict[str, set[Need]] = {}
    methods = client_methods()
    sources = sorted(OPERATOR_SRC.glob("*.py"))
    trees = [ast.parse(source.read_text()) for source in sources]
    unreached = _unreached(trees)
    for source, tree in zip(sources, trees, strict=True):
        classes = _api_classes(tree)
        for node in ast.walk(tree):
            where = f"{source.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                # A raw request past the generated methods: the test cannot tell what it needs.
                assert node.func.attr not in ("call_api", "param_serialize"), (
                    f"{where}: a raw {node.func.attr}() request; use the client's typed methods, so that "
                    "this test can map it to an RBAC rule"
                )
            if not isinstance(node, ast.Attribute) or node.attr not in methods or id(node) in unreached:
                continue
            by_class = methods[node.attr]
            receiver = (
                node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            )
            cls = classes.get(receiver)
            if cls is None:
                options = {frozenset(n) for n in by_class.values()}
                assert len(options) == 1, f"{where}: {node.attr} on an API object of unknown class"
                calls[f"{where} {node.attr}"] = set(next(iter(options)))
            else:
                assert cls in by_class, f"{where}: {cls} has no method {node.attr}"
                calls[f"{where} {node.attr}"] = by_class[cls]
    return calls


def test_the_call_scan_reads_the_clients_paths() -> None:
    assert client_methods()["read_namespaced_pod_log"]["CoreV1Api"] == {("", "pods/log", "get")}
    assert client_methods()["list_job_for_all_namespaces"]["BatchV1Api"] == {
        ("batch", "jobs", "list"),
        ("batch", "jobs", "watch"),
    }
    assert client_methods()["patch_namespaced_custom_object_status"]["CustomObjectsApi"] == {
        (GROUP, f"{PLURAL}/status", "patch")
    }
    assert client_methods()["create_namespaced_event"] == {
        "CoreV1Api": {("", "events", "create")},
        "EventsV1Api": {("events.k8s.io", "events", "create")},
    }
    assert client_methods()["replace_namespaced_lease"]["CoordinationV1Api"] == {
        ("coordination.k8s.io", "leases", "update")
    }
    calls = operator_api_calls()
    assert any(k.startswith("kube.py:") for k in calls) and any(k.startswith("leader.py:") for k in calls)


def test_every_api_call_has_a_rule_and_every_rule_a_call() -> None:
    """Each Kubernetes API call in operator/src/kubetune_operator/ maps to a rule of rbac.py, and each rule
    is needed by a call: a new API call fails this test until rbac.py grants it (then `make generate`),
    and a rule outlives no call."""
    calls = operator_api_calls()
    needed = {n for needs in calls.values() for n in needs}
    roles = (rbac.OPERATOR, rbac.SECRET_PRECHECK, rbac.LEADER_ELECTION, rbac.POLICY_READER)
    granted = {(g, r, v) for g, r, v, _ in rbac.grants(*roles)}
    missing = {f"{k}: {sorted(n - granted)}" for k, n in calls.items() if n - granted}
    assert not missing, f"API calls without an RBAC rule in rbac.py: {sorted(missing)}"
    assert not granted - needed, f"rules of rbac.py that no API call needs: {sorted(granted - needed)}"
    # Leases are leader election's alone, in the operator's own namespace.
    leases = {n for n in needed if n[1] == "leases"}
    assert leases == {(g, r, v) for g, r, v, _ in rbac.grants(rbac.LEADER_ELECTION)}


def test_rules_are_granted_once() -> None:
    """No (group, resource, verb) in two rules of one role: each grant has one reason."""
    for role, rules in rbac.ROLES.items():
        seen: set[tuple[str, str, str, str]] = set()
        for rule in rules:
            assert not rule.grants() & seen, (role, rule)
            seen |= rule.grants()
            assert rule.why.endswith("."), rule


def test_watch_namespace_grants_a_role_there_only(helm: Helm) -> None:
    docs = helm.template("--set", "watchNamespace=ml-team")
    # Cluster-wide: only the roles for people (aggregated into edit/view), which grant the operator nothing.
    cluster_wide = [
        (d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")
    ]
    assert cluster_wide == [("ClusterRole", "kubetune-edit"), ("ClusterRole", "kubetune-view")]
    role = one(docs, "Role", "kubetune")
    assert role["metadata"]["namespace"] == "ml-team"
    assert expand(role["rules"]) == OPERATOR_RULES
    binding = one(docs, "RoleBinding", "kubetune")
    assert binding["metadata"]["namespace"] == "ml-team"
    assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == "kubetune"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": RELEASE_NS}]
    assert flag(container(docs), "namespace") == "ml-team"


def test_leader_election(helm: Helm) -> None:
    docs = helm.template("--set", "replicaCount=2", "--set", "leaderElection.enabled=true")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert "strategy" not in deployment["spec"]  # rolling updates: the Lease keeps one leader
    c = container(docs)
    assert flag(c, "leader-elect") == ""
    assert flag(c, "leader-election-namespace") == RELEASE_NS
    role = one(docs, "Role", "kubetune-leader-election")
    assert role["metadata"]["namespace"] == RELEASE_NS
    assert expand(role["rules"]) == LEADER_ELECTION_RULES
    binding = one(docs, "RoleBinding", "kubetune-leader-election")
    assert binding["metadata"]["namespace"] == RELEASE_NS
    assert binding["roleRef"]["name"] == "kubetune-leader-election"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": RELEASE_NS}]


def test_replicas_need_leader_election(helm: Helm) -> None:
    assert "leaderElection.enabled=true" in helm.template_fails("--set", "replicaCount=2")


def test_metrics_service(helm: Helm) -> None:
    docs = helm.template("--set", "metrics.enabled=true")
    c = container(docs)
    assert flag(c, "metrics-addr") == "0.0.0.0:8081"
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in c["ports"]
    service = one(docs, "Service", "kubetune-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_service_monitor_only_when_enabled(helm: Helm) -> None:
    for args in ([], ["--set", "metrics.enabled=true"]):
        assert "ServiceMonitor" not in {d["kind"] for d in helm.template(*args)}
    docs = helm.template(
        "--set",
        "metrics.enabled=true,metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.interval=15s",
        "--set",
        "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
    )
    monitor = one(docs, "ServiceMonitor", "kubetune")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == RELEASE_NS
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    endpoint = {"port": "metrics", "path": "/metrics", "interval": "15s", "honorLabels": True}
    assert monitor["spec"]["endpoints"] == [endpoint]  # honorLabels: the per-job `namespace` label
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NS]}
    # It selects the metrics Service, and that Service alone, by a port of that name.
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [
        d
        for d in services
        if monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    assert [d["metadata"]["name"] for d in selected] == ["kubetune-metrics"]
    assert [p["name"] for p in selected[0]["spec"]["ports"]] == ["metrics"]
    timeout = helm.template(
        "--set",
        "metrics.enabled=true,metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.scrapeTimeout=5s",
    )
    assert one(timeout, "ServiceMonitor")["spec"]["endpoints"][0]["scrapeTimeout"] == "5s"
    # Without the metrics Service there is nothing to scrape.
    assert "metrics.enabled=true" in helm.template_fails("--set", "metrics.serviceMonitor.enabled=true")
    assert "interval" in helm.template_fails(
        "--set",
        "metrics.enabled=true,metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.interval=often",
    )


def test_no_grant_for_trainer_pods() -> None:
    """Trainer pods report progress in their log (the operator reads it): they run without a token, and
    the chart grants them nothing. The Role and the value that used to grant them `patch` on pods are gone."""
    templates = {p.name for p in (CHART / "templates").iterdir()}
    assert "trainer-rbac.yaml" not in templates
    assert "trainerRBAC" not in (CHART / "values.yaml").read_text()
    assert "trainerRBAC" not in json.loads((CHART / "values.schema.json").read_text())["properties"]


def test_secret_precheck_can_be_turned_off(helm: Helm) -> None:
    assert flag(container(helm.template()), "no-secret-precheck") is None
    docs = helm.template("--set", "secretPreCheck.enabled=false")
    assert expand(one(docs, "ClusterRole", "kubetune")["rules"]) == OPERATOR_RULES - SECRET_PRECHECK_RULES
    assert flag(container(docs), "no-secret-precheck") == ""
    role = one(helm.template("--set", "secretPreCheck.enabled=false,watchNamespace=ml"), "Role", "kubetune")
    assert expand(role["rules"]) == OPERATOR_RULES - SECRET_PRECHECK_RULES


def test_values_flow_into_the_deployment(helm: Helm) -> None:
    docs = helm.template(
        "--set",
        "image.tag=0.2.0,workers=8,logFormat=text,trainerImage=registry.example/trainer:1,imagePullGraceSeconds=60",
        "--set",
        "priorityClassName=system-cluster-critical,nodeSelector.role=ops",
        "--set-json",
        'tolerations=[{"key":"ops","operator":"Exists","effect":"NoSchedule"}]',
        "--set",
        "serviceAccount.annotations.team=ml,podAnnotations.a=b",
    )
    c = container(docs)
    assert c["image"] == "ghcr.io/kubetune/operator:0.2.0"
    assert flag(c, "workers") == "8" and flag(c, "log-format") == "text"
    assert flag(c, "image") == "registry.example/trainer:1"
    assert flag(c, "image-pull-grace") == "60"
    pod = one(docs, "Deployment")["spec"]["template"]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["nodeSelector"] == {"role": "ops"}
    assert pod["spec"]["tolerations"] == [{"key": "ops", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["metadata"]["annotations"] == {"a": "b"}
    assert one(docs, "ServiceAccount")["metadata"]["annotations"] == {"team": "ml"}

    digest = "sha256:" + "a" * 64
    assert container(helm.template("--set", f"image.digest={digest}"))["image"] == (
        f"ghcr.io/kubetune/operator@{digest}"
    )

    docs = helm.template("--set", "serviceAccount.create=false,serviceAccount.name=existing")
    assert "ServiceAccount" not in {d["kind"] for d in docs}
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    assert one(docs, "ClusterRoleBinding")["subjects"][0]["name"] == "existing"
    assert "serviceAccount.name" in helm.template_fails("--set", "serviceAccount.create=false")


def test_kube_version_constraint(helm: Helm) -> None:
    helm.template("--kube-version=1.30.0")
    assert "kubeVersion" in helm.template_fails("--kube-version=1.29.9")


# ---------------------------------------------------------------------------------------------------
# values.yaml and values.schema.json
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "bogus=1"],
        ["--set", "image.bogus=1"],
        ["--set", "leaderElection.bogus=1"],
        ["--set", "metrics.service.bogus=1"],
        ["--set", "metrics.serviceMonitor.bogus=1"],
        ["--set", "secretPreCheck.bogus=1"],
        ["--set", "policy.allowedImages=x"],
        ["--set", "admissionPolicy.bogus=1"],
        ["--set", "aggregatedRoles.bogus=1"],
        ["--set", "securityContext.bogus=1"],
        ["--set", "resources.bogus=1"],
        ["--set", "replicas=2"],  # the key is replicaCount
    ],
    ids=lambda a: a[-1].split("=")[0],
)
def test_schema_rejects_unknown_keys(helm: Helm, args: list[str]) -> None:
    key = args[-1].split("=")[0].rsplit(".", 1)[-1]
    assert f"additional properties '{key}' not allowed" in helm.template_fails(*args)


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "logFormat=xml"],
        ["--set", "workers=0"],
        ["--set", "image.pullPolicy=Sometimes"],
        ["--set", "watchNamespace=Not_A_Namespace"],
        ["--set", "replicaCount=two"],
        ["--set", "imagePullGraceSeconds=-1"],
        ["--set", "secretPreCheck.enabled=maybe"],
        ["--set", "policy.maxGPUsPerJob=-1"],
        ["--set", "policy.maxGPUsPerJob=eight"],
        ["--set-json", 'policy.allowedImagePrefixes=[""]'],
        ["--set", "admissionPolicy.parameterNotFoundAction=Ignore"],
        ["--set-json", 'admissionPolicy.validationActions=["Block"]'],
        ["--set-json", "admissionPolicy.validationActions=[]"],
    ],
    ids=lambda a: a[-1],
)
def test_schema_rejects_bad_values(helm: Helm, args: list[str]) -> None:
    helm.template_fails(*args)


def _schema_objects(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield path, node
        for key, value in node.items():
            yield from _schema_objects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _schema_objects(value, f"{path}/{i}")


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, node in _schema_objects(schema):
        # Either a closed record (additionalProperties: false) or a map whose values are typed.
        extra = node.get("additionalProperties")
        open_k8s_subtree = path.startswith("/properties/affinity/properties/")
        assert extra is False or isinstance(extra, dict) or open_k8s_subtree, f"{path or '/'} is open"


def _keys(node: yaml.Node, path: str = "") -> Iterator[tuple[str, int]]:
    """(dotted key path, 0-based line) of every mapping key in a composed YAML document."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            dotted = f"{path}.{key.value}" if path else str(key.value)
            yield dotted, key.start_mark.line
            yield from _keys(value, dotted)


# Kubernetes objects passed through as they are: their own fields need no comment of ours.
PASSTHROUGH = ("resources.", "podSecurityContext.", "securityContext.", "affinity.", "nodeSelector.")


def test_every_value_is_documented_and_in_the_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    schema = json.loads((CHART / "values.schema.json").read_text())
    root = yaml.compose(text)
    assert root is not None
    for dotted, line in _keys(root):
        if dotted.startswith(PASSTHROUGH):
            continue
        assert lines[line - 1].lstrip().startswith("#"), f"values.yaml:{line + 1}: {dotted} has no comment"
        node = schema
        for part in dotted.split("."):
            assert part in node.get("properties", {}), f"{dotted} is not in values.schema.json"
            node = node["properties"][part]
    # And the other way round: every key the schema allows has a default in values.yaml.
    values = yaml.safe_load(text)

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            dotted = f"{path}{key}"
            if dotted.startswith(PASSTHROUGH):
                continue
            assert isinstance(value, dict) and key in value, f"{dotted} has no default in values.yaml"
            walk(sub, value[key], f"{dotted}.")

    walk(schema, values, "")


def test_values_yaml_validates_against_the_schema_and_the_model() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(values)] == []
    Values.model_validate(values)  # strict, closed: every key of values.yaml is in the model


def test_the_schema_and_the_model_reject_alike() -> None:
    """values.schema.json is the model's: a bad value fails both (helm's own check is the tests above)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    validator = jsonschema.Draft7Validator(json.loads((CHART / "values.schema.json").read_text()))
    for path, bad in [
        ("bogus", 1),
        ("metrics.serviceMonitor.bogus", 1),
        ("metrics.serviceMonitor.interval", "often"),
        ("workers", 0),
        ("logFormat", "xml"),
        ("securityContext.capabilities.drop", ["NET_RAW"]),
        ("securityContext.capabilities.add", ["NET_ADMIN"]),
        ("podSecurityContext.runAsNonRoot", False),
        ("policy.maxGPUsPerJob", -1),
        ("admissionPolicy.validationActions", ["Deny", "Deny"]),
        ("image.digest", "sha256:short"),
    ]:
        doc = json.loads(json.dumps(values))
        *parents, key = path.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[key] = bad
        assert list(validator.iter_errors(doc)), f"the schema takes {path}={bad!r}"
        if path != "admissionPolicy.validationActions":  # uniqueItems: a schema keyword, not a type
            with pytest.raises(ValueError):
                Values.model_validate(doc)


# ---------------------------------------------------------------------------------------------------
# manifests/base: the same grants and pod as the chart
# ---------------------------------------------------------------------------------------------------


def _base_docs() -> list[dict[str, Any]]:
    return [
        d for f in ("rbac.yaml", "deployment.yaml") for d in yaml.safe_load_all((BASE / f).read_text()) if d
    ]


def test_base_rbac_is_the_charts(helm: Helm) -> None:
    base = _base_docs()
    chart = helm.template("--set", "leaderElection.enabled=true")
    assert expand(one(base, "ClusterRole")["rules"]) == expand(one(chart, "ClusterRole", "kubetune")["rules"])
    assert expand(one(base, "ClusterRole")["rules"]) == OPERATOR_RULES
    assert (
        expand(one(base, "Role", "kubetune-operator-leader-election")["rules"])
        == expand(one(chart, "Role", "kubetune-leader-election")["rules"])
        == LEADER_ELECTION_RULES
    )
    assert (
        expand(one(base, "Role", "kubetune-policy-reader")["rules"])
        == expand(one(chart, "Role", "kubetune-policy-reader")["rules"])
        == POLICY_RULES
    )
    assert kinds(base) == [
        ("ClusterRole", "kubetune-operator"),
        ("ClusterRoleBinding", "kubetune-operator"),
        ("Deployment", "kubetune-operator"),
        ("Role", "kubetune-operator-leader-election"),
        ("Role", "kubetune-policy-reader"),
        ("RoleBinding", "kubetune-operator-leader-election"),
        ("RoleBinding", "kubetune-policy-reader"),
        ("ServiceAccount", "kubetune-operator"),
    ]
    for binding in (d for d in base if d["kind"].endswith("Binding")):
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": "kubetune-system"}
        ]
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "kubetune-system"
    # The CRD from manifests/crd itself (a kustomization of its own), not a copy.
    assert "../crd" in kustomization["resources"]
    assert not (BASE / "crd").exists()


def test_base_pod_is_the_charts(helm: Helm) -> None:
    base_pod = one(_base_docs(), "Deployment")["spec"]["template"]["spec"]
    chart_pod = one(helm.template("--set", "leaderElection.enabled=true"), "Deployment")["spec"]["template"][
        "spec"
    ]
    assert base_pod["securityContext"] == chart_pod["securityContext"]
    assert base_pod["volumes"] == chart_pod["volumes"]
    [b], [c] = base_pod["containers"], chart_pod["containers"]
    for key in ("command", "securityContext", "livenessProbe", "readinessProbe", "ports", "volumeMounts"):
        assert b[key] == c[key], key
    assert b["image"] == c["image"] == "ghcr.io/kubetune/operator:0.1.0"
    # The chart passes the Lease's namespace explicitly; the base relies on POD_NAMESPACE.
    chart_args = [a for a in c["args"] if not a.startswith("--leader-election-namespace=")]
    assert b["args"] == chart_args
    assert {e["name"] for e in b["env"]} == {e["name"] for e in c["env"]}


# ---------------------------------------------------------------------------------------------------
# The policy: limits (the ConfigMap), the admission policies, the roles for people
# ---------------------------------------------------------------------------------------------------


def test_policy_values_fill_the_configmap_the_operator_reads(helm: Helm) -> None:
    docs = helm.template()
    configmap = one(docs, "ConfigMap", "kubetune-policy")
    assert configmap["metadata"]["namespace"] == RELEASE_NS
    assert set(configmap["data"]) == set(KEYS)  # every key, empty: no limit
    assert load(configmap["data"], "x") == Limits("x")
    assert flag(container(docs), "policy-configmap") == f"{RELEASE_NS}/kubetune-policy"

    docs = helm.template(
        "--set-json",
        'policy.allowedImagePrefixes=["registry.example.com/ml/","ghcr.io/kubetune/"]',
        "--set",
        "policy.maxGPUsPerJob=1000000",
        "--set-json",
        'policy.allowedTolerationKeys=["team-a"]',
        "--set-json",
        'policy.allowedNodeSelectorKeys=["pool","zone"]',
        "--set-json",
        'policy.allowedPriorityClasses=["low"]',
    )
    data = one(docs, "ConfigMap", "kubetune-policy")["data"]
    assert data["maxGPUsPerJob"] == "1000000"  # not 1e+06
    assert load(data, "x") == Limits(
        "x",
        allowed_image_prefixes=("registry.example.com/ml/", "ghcr.io/kubetune/"),
        max_gpus_per_job=1000000,
        allowed_priority_classes=("low",),
        allowed_toleration_keys=("team-a",),
        allowed_node_selector_keys=("pool", "zone"),
    )
    # Their own ConfigMap: the chart makes none, and everything else still points at it.
    docs = helm.template("--set", "policy.create=false")
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    assert flag(container(docs), "policy-configmap") == f"{RELEASE_NS}/kubetune-policy"
    assert one(docs, "ValidatingAdmissionPolicyBinding", "kubetune-limits")["spec"]["paramRef"]["name"] == (
        "kubetune-policy"
    )


def test_the_operator_may_read_that_one_configmap(helm: Helm) -> None:
    for args in ([], ["--set", "watchNamespace=ml-team"]):
        docs = helm.template(*args)
        role = one(docs, "Role", "kubetune-policy-reader")
        assert role["metadata"]["namespace"] == RELEASE_NS
        assert expand(role["rules"]) == POLICY_RULES
        binding = one(docs, "RoleBinding", "kubetune-policy-reader")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "kubetune", "namespace": RELEASE_NS}
        ]


def test_admission_policies_are_the_generated_ones(helm: Helm) -> None:
    docs = helm.template()
    for suffix, spec in admission_policies().items():
        name = f"kubetune-{suffix}"
        policy = one(docs, "ValidatingAdmissionPolicy", name)
        assert "namespace" not in policy["metadata"]
        assert json.dumps(policy["spec"], sort_keys=True) == json.dumps(spec, sort_keys=True)
        binding = one(docs, "ValidatingAdmissionPolicyBinding", name)
        assert binding["spec"]["policyName"] == name
        assert binding["spec"]["validationActions"] == ["Deny"]
        assert "matchResources" not in binding["spec"]  # every namespace
    # The limits come from the ConfigMap in the release namespace; without it, nothing is admitted.
    assert one(docs, "ValidatingAdmissionPolicyBinding", "kubetune-limits")["spec"]["paramRef"] == {
        "name": "kubetune-policy",
        "namespace": RELEASE_NS,
        "parameterNotFoundAction": "Deny",
    }
    # The author-access check has no parameter: nothing done to the ConfigMap can turn it off.
    assert "paramRef" not in one(docs, "ValidatingAdmissionPolicyBinding", "kubetune-author-access")["spec"]

    docs = helm.template(
        "--set",
        "watchNamespace=ml-team,admissionPolicy.parameterNotFoundAction=Allow",
        "--set-json",
        'admissionPolicy.validationActions=["Warn","Audit"]',
    )
    for suffix in admission_policies():
        spec = one(docs, "ValidatingAdmissionPolicyBinding", f"kubetune-{suffix}")["spec"]
        assert spec["validationActions"] == ["Warn", "Audit"]
        assert spec["matchResources"] == {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml-team"}}
        }
    assert (
        one(docs, "ValidatingAdmissionPolicyBinding", "kubetune-limits")["spec"]["paramRef"][
            "parameterNotFoundAction"
        ]
        == "Allow"
    )

    off = helm.template("--set", "admissionPolicy.enabled=false")
    assert not [d for d in off if d["kind"].startswith("ValidatingAdmissionPolicy")]
    # The operator still checks the limits (for clusters where the policy is off).
    assert flag(container(off), "policy-configmap") == f"{RELEASE_NS}/kubetune-policy"
    one(off, "ConfigMap", "kubetune-policy")


def test_roles_for_people_aggregate_into_edit_admin_and_view(helm: Helm) -> None:
    docs = helm.template()
    edit, view = one(docs, "ClusterRole", "kubetune-edit"), one(docs, "ClusterRole", "kubetune-view")
    assert expand(edit["rules"]) == USER_EDIT_RULES
    assert expand(view["rules"]) == USER_VIEW_RULES
    aggregated = {
        name: sorted(
            k.removeprefix(AGGREGATE)
            for k, v in role["metadata"]["labels"].items()
            if k.startswith(AGGREGATE) and v == "true"
        )
        for name, role in (("edit", edit), ("view", view))
    }
    assert aggregated == {"edit": ["admin", "edit"], "view": ["view"]}
    # Status is the operator's: no one else may write it.
    assert not {
        r
        for r in USER_EDIT_RULES | USER_VIEW_RULES
        if r[1] == "finetunejobs/status" and r[2] not in ("get", "list", "watch")
    }
    off = helm.template("--set", "aggregatedRoles.enabled=false")
    assert [d["metadata"]["name"] for d in off if d["kind"] == "ClusterRole"] == ["kubetune"]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_base_policy_and_roles_are_the_charts(helm: Helm) -> None:
    chart = helm.template()
    base = [
        d for f in ("policy.yaml", "admission-policy.yaml", "user-roles.yaml") for d in _docs(BASE / f)
    ] + [d for d in _docs(BASE / "rbac.yaml") if d["metadata"]["name"] == "kubetune-policy-reader"]
    assert kinds(base) == [
        ("ClusterRole", "kubetune-edit"),
        ("ClusterRole", "kubetune-view"),
        ("ConfigMap", "kubetune-policy"),
        ("Role", "kubetune-policy-reader"),
        ("RoleBinding", "kubetune-policy-reader"),
        ("ValidatingAdmissionPolicy", "kubetune-author-access"),
        ("ValidatingAdmissionPolicy", "kubetune-limits"),
        ("ValidatingAdmissionPolicyBinding", "kubetune-author-access"),
        ("ValidatingAdmissionPolicyBinding", "kubetune-limits"),
    ]
    for kind, name in kinds(base):
        b, c = one(base, kind, name), one(chart, kind, name)
        if kind in ("ClusterRole", "Role"):
            assert expand(b["rules"]) == expand(c["rules"]), name
            assert {k: v for k, v in b["metadata"]["labels"].items() if k.startswith(AGGREGATE)} == {
                k: v for k, v in c["metadata"]["labels"].items() if k.startswith(AGGREGATE)
            }
        elif kind == "ConfigMap":
            assert load(b["data"], "x") == load(c["data"], "x") == Limits("x")
        elif kind == "RoleBinding":
            assert b["roleRef"] == c["roleRef"]
            assert b["subjects"] == [
                {"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": "kubetune-system"}
            ]
        else:  # the policies, and their bindings (the release namespace is kubetune-system in both)
            assert json.dumps(b["spec"], sort_keys=True) == json.dumps(c["spec"], sort_keys=True), name
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert {"policy.yaml", "admission-policy.yaml", "user-roles.yaml"} <= set(kustomization["resources"])
    # kustomize takes ValidatingAdmissionPolicies for namespaced: this transformer takes the namespace away.
    assert kustomization["transformers"] == ["cluster-scoped.yaml"]


def test_single_namespace_overlay_grants_the_operator_a_role_there_only(helm: Helm) -> None:
    overlay = _docs(SINGLE_NAMESPACE / "role.yaml")
    chart = helm.template("--set", "watchNamespace=ml-team")
    role = one(overlay, "Role", "kubetune-operator")
    assert role["metadata"]["namespace"] == "ml-team"
    assert expand(role["rules"]) == expand(one(chart, "Role", "kubetune")["rules"]) == OPERATOR_RULES
    binding = one(overlay, "RoleBinding", "kubetune-operator")
    assert binding["metadata"]["namespace"] == "ml-team"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "kubetune-operator",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": "kubetune-system"}
    ]
    # What kustomize makes of it: test_kustomize_single_namespace_overlay_grants_a_role_there_only here,
    # and tests/e2e/test_install.py on a real API server.
    kustomization = yaml.safe_load((SINGLE_NAMESPACE / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../base", "role.yaml"]


# ---------------------------------------------------------------------------------------------------
# kustomize: what `kubectl kustomize` makes of the base and the overlays (the real kubectl)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kubectl() -> Path:
    if SKIP:
        pytest.skip("KUBETUNE_SKIP_E2E=1: kubectl is not built")
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import controlplane  # the e2e control plane's binaries (built from Go modules, cached)

    try:
        return controlplane.build() / "kubectl"
    except controlplane.ControlPlaneError as e:
        pytest.fail(f"{e} (set KUBETUNE_SKIP_E2E=1 to skip)", pytrace=False)


def kustomize(kubectl: Path, folder: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(kubectl), "kustomize", str(folder)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_kustomize_base_installs_the_generated_crd_and_rules(kubectl: Path) -> None:
    docs = kustomize(kubectl, BASE)
    crd = one(docs, "CustomResourceDefinition")
    labels = crd["metadata"]["labels"]
    assert labels.pop("app.kubernetes.io/part-of") == "kubetune"
    assert labels.pop("app.kubernetes.io/managed-by") == "kustomize"
    assert "namespace" not in crd["metadata"]
    assert json.dumps(crd, sort_keys=True) == json.dumps(yaml.safe_load(CRD.read_text()), sort_keys=True)
    assert expand(one(docs, "ClusterRole", "kubetune-operator")["rules"]) == OPERATOR_RULES
    leader = one(docs, "Role", "kubetune-operator-leader-election")
    assert leader["metadata"]["namespace"] == "kubetune-system"
    assert expand(leader["rules"]) == LEADER_ELECTION_RULES
    assert expand(one(docs, "Role", "kubetune-policy-reader")["rules"]) == POLICY_RULES


def test_kustomize_single_namespace_overlay_grants_a_role_there_only(kubectl: Path) -> None:
    docs = kustomize(kubectl, SINGLE_NAMESPACE)
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"] == [
        "kubetune-edit",
        "kubetune-view",
    ]
    assert "ClusterRoleBinding" not in {d["kind"] for d in docs}
    role = one(docs, "Role", "kubetune-operator")
    assert role["metadata"]["namespace"] == "ml-team"
    assert expand(role["rules"]) == OPERATOR_RULES
    one(docs, "CustomResourceDefinition")
    # The example overlay builds too (it binds the base ClusterRole in ml-team).
    example = kustomize(kubectl, ROOT / "manifests" / "overlays" / "example")
    assert expand(one(example, "ClusterRole", "kubetune-operator")["rules"]) == OPERATOR_RULES
