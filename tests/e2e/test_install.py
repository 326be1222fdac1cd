"""Installing kubetune: the Helm chart and the kustomize overlay against the real control plane.

The chart is `helm install`ed (helm built from the Go module proxy by hack/helm/build.sh); then the
operator runs in-process, as in test_operator.py, but with the chart's ServiceAccount credentials: a
token from the TokenRequest API. A FineTuneJob that exercises every verb the operator uses (create,
suspend, edit, finish) reaching Succeeded shows the RBAC grants enough; SelfSubjectRulesReview and
refused requests (listing Secrets, writes the operator never makes) show it grants nothing more.
No Deployment pod runs here (no replicaset controller, and no image): the operator's code is the
same either way.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import ControlPlane, poll
from kubernetes import client
from kubernetes.client.rest import ApiException
from test_operator import spec  # one FineTuneJob spec shape for the e2e tests

from kubetune.contract import MANAGED_BY as MANAGED
from kubetune_operator.kube import Kube, load_client
from kubetune_operator.operator import Operator

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the expected grants are defined once, in test_chart.py
from test_chart import LEADER_ELECTION_RULES, OPERATOR_RULES, Rule, expand  # noqa: E402

CHART = ROOT / "charts" / "kubetune"
BUILD_HELM = ROOT / "hack" / "helm" / "build.sh"
LEASE = "kubetune-operator"
SLOW = {"pod-complete.stage.kwok.x-k8s.io/delay": "600s"}  # stays Running until the spec changes
FAKE_TOKEN = "hf_" + "E2eNeverLeaks0123456789abcdefgh"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/warn": "restricted",
}


# ---------------------------------------------------------------------------------------------------
# Fixtures: helm, the CRD, one release for the module
# ---------------------------------------------------------------------------------------------------


class Helm:
    def __init__(self, binary: Path, home: Path, kubeconfig: Path) -> None:
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": str(kubeconfig),
            "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])),
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
            env=self.env,
            check=False,
        )
        if check:
            assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stderr}{proc.stdout}"
        return proc


@pytest.fixture(scope="module")
def helm(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    proc = subprocess.run(
        ["bash", str(BUILD_HELM)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            "cannot build helm with hack/helm/build.sh (it needs Go >= 1.26 and the Go module proxy; "
            f"set KUBETUNE_SKIP_E2E=1 to skip):\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    binary = Path(proc.stdout.strip().splitlines()[-1])
    return Helm(binary, tmp_path_factory.mktemp("helm-home"), control_plane.kubeconfig)


def create_namespace(cp: ControlPlane, name: str, labels: dict[str, str] | None = None) -> None:
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
    cp.kubectl("create", "-f", "-", input=json.dumps(doc), check=True)
    poll(
        lambda: cp.kubectl("get", "serviceaccount", "default", f"--namespace={name}").returncode == 0,
        timeout=30,
        what=f"the default ServiceAccount in {name}",
    )


@dataclass
class Release:
    name: str
    namespace: str  # the release's: the operator's ServiceAccount and its Lease live here
    watched: str  # where the FineTuneJobs run
    other: str  # a namespace with a Secret the operator must not read
    service_account: str
    kubeconfig: Path  # the operator's ServiceAccount token
    baseline: Path  # a ServiceAccount that nothing is bound to: what every authenticated user may do


def token_kubeconfig(cp: ControlPlane, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig with nothing but a TokenRequest token for the ServiceAccount (server and CA from the
    admin kubeconfig)."""
    token = cp.kubectl(
        "create", "token", service_account, f"--namespace={namespace}", "--duration=1h", check=True
    ).stdout.strip()
    assert token.count(".") == 2, "not a JWT"
    return cp.kubeconfig_for_token(token, path)


@pytest.fixture(scope="module")
def release(
    control_plane: ControlPlane, helm: Helm, crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    suffix = secrets.token_hex(3)
    name = f"kt-{suffix}"
    ns, watched, other = f"e2e-install-{suffix}", f"e2e-install-{suffix}-jobs", f"e2e-install-{suffix}-other"
    created: list[str] = []
    try:
        for n, labels in ((ns, RESTRICTED), (watched, None), (other, None)):
            create_namespace(control_plane, n, labels)
            created.append(n)
        control_plane.kubectl(
            "create",
            "secret",
            "generic",
            "hf-token",
            f"--namespace={other}",
            "--from-literal=token=x",
            check=True,
        )
        # Everything optional on: leader election, metrics (and the Secret pre-check, on by default). The
        # CRD is already installed (without Helm's ownership), so the release must not take it over.
        helm(
            "install",
            name,
            str(CHART),
            f"--namespace={ns}",
            "--set=crds.enabled=false",
            "--set=replicaCount=2,leaderElection.enabled=true",
            "--set=metrics.enabled=true",
        )
        manifest = helm("get", "manifest", name, f"--namespace={ns}").stdout
        [sa] = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "ServiceAccount"]
        sa_name = sa["metadata"]["name"]
        tmp = tmp_path_factory.mktemp("install")
        control_plane.kubectl("create", "serviceaccount", "baseline", f"--namespace={ns}", check=True)
        yield Release(
            name=name,
            namespace=ns,
            watched=watched,
            other=other,
            service_account=sa_name,
            kubeconfig=token_kubeconfig(control_plane, ns, sa_name, tmp / "operator.kubeconfig"),
            baseline=token_kubeconfig(control_plane, ns, "baseline", tmp / "baseline.kubeconfig"),
        )
    finally:
        helm("uninstall", name, f"--namespace={ns}", check=False)
        for n in created:
            control_plane.kubectl("delete", "namespace", n, "--wait=false", "--ignore-not-found")


def as_operator(cp: ControlPlane, release: Release, *args: str) -> subprocess.CompletedProcess[str]:
    return cp.kubectl(*args, kubeconfig=release.kubeconfig)


# ---------------------------------------------------------------------------------------------------
# kustomize
# ---------------------------------------------------------------------------------------------------


def test_kustomize_overlay_and_base_apply_with_server_dry_run(control_plane: ControlPlane, crd: None) -> None:
    # The overlay installs into kubetune-system and watches ml-team, which must exist for a dry run
    # (it creates nothing). kubetune-system gets the base's own Namespace object: restricted pods.
    made = []
    for name in ("kubetune-system", "ml-team"):
        if control_plane.kubectl("get", "namespace", name).returncode != 0:
            made.append(name)
    try:
        control_plane.kubectl("apply", "-f", str(ROOT / "manifests/base/namespace.yaml"), check=True)
        if "ml-team" in made:
            create_namespace(control_plane, "ml-team")
        for kustomization in (
            "manifests/overlays/example",
            "manifests/overlays/single-namespace",
            "manifests/base",
        ):
            proc = control_plane.kubectl("apply", "-k", str(ROOT / kustomization), "--dry-run=server")
            assert proc.returncode == 0, f"{kustomization}: {proc.stderr}"
            assert "PodSecurity" not in proc.stderr, proc.stderr  # the namespace warns on violations
            applied = proc.stdout
            assert "deployment.apps/kubetune-operator created (server dry run)" in applied, applied
            operator_role = "clusterrole.rbac.authorization.k8s.io/kubetune-operator created"
            assert (operator_role in applied) == (kustomization != "manifests/overlays/single-namespace"), (
                applied
            )
            for created in (
                "validatingadmissionpolicy.admissionregistration.k8s.io/kubetune-limits",
                "validatingadmissionpolicybinding.admissionregistration.k8s.io/kubetune-author-access",
                "configmap/kubetune-policy",
                "clusterrole.rbac.authorization.k8s.io/kubetune-edit",
            ):
                assert created in applied, applied

        def build(kustomization: str) -> list[dict[str, Any]]:
            out = control_plane.kubectl("kustomize", str(ROOT / kustomization), check=True).stdout
            return [d for d in yaml.safe_load_all(out) if d]

        # The base: the admission policies are cluster-scoped (kustomize would give them a namespace).
        for d in build("manifests/base"):
            if d["kind"].startswith("ValidatingAdmissionPolicy"):
                assert "namespace" not in d["metadata"], d["metadata"]
        # One namespace, as the chart's watchNamespace: a Role there, no cluster-wide grant for the
        # operator, and the admission policies bound to that namespace.
        single = build("manifests/overlays/single-namespace")
        grants = sorted(
            (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
            for d in single
            if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
        )
        assert grants == [
            ("ClusterRole", "kubetune-edit", None),  # for people, aggregated into edit/admin
            ("ClusterRole", "kubetune-view", None),
            ("Role", "kubetune-operator", "ml-team"),
            ("Role", "kubetune-operator-leader-election", "kubetune-system"),
            ("Role", "kubetune-policy-reader", "kubetune-system"),
            ("RoleBinding", "kubetune-operator", "ml-team"),
            ("RoleBinding", "kubetune-operator-leader-election", "kubetune-system"),
            ("RoleBinding", "kubetune-policy-reader", "kubetune-system"),
        ]
        [role] = [d for d in single if d["kind"] == "Role" and d["metadata"]["name"] == "kubetune-operator"]
        assert expand(role["rules"]) == OPERATOR_RULES
        [deployment] = [d for d in single if d["kind"] == "Deployment"]
        [c] = deployment["spec"]["template"]["spec"]["containers"]
        assert "--namespace=ml-team" in c["args"]
        assert "--policy-configmap=kubetune-system/kubetune-policy" in c["args"]
        for d in single:
            if d["kind"] == "ValidatingAdmissionPolicyBinding":
                assert d["spec"]["matchResources"] == {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml-team"}}
                }

        overlay = [
            d
            for d in yaml.safe_load_all(
                control_plane.kubectl(
                    "kustomize", str(ROOT / "manifests/overlays/example"), check=True
                ).stdout
            )
            if d
        ]
        bindings = [
            (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
            for d in overlay
            if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
        ]
        # No cluster-wide grant: the ClusterRole is bound in ml-team only (plus leader election and the
        # policy ConfigMap, in the operator's own namespace).
        assert sorted(bindings) == [
            ("RoleBinding", "kubetune-operator", "ml-team"),
            ("RoleBinding", "kubetune-operator-leader-election", "kubetune-system"),
            ("RoleBinding", "kubetune-policy-reader", "kubetune-system"),
        ]
        [deployment] = [d for d in overlay if d["kind"] == "Deployment"]
        assert deployment["spec"]["replicas"] == 2
        [c] = deployment["spec"]["template"]["spec"]["containers"]
        assert "--leader-elect" in c["args"] and "--namespace=ml-team" in c["args"]
        assert c["image"] == "registry.example.com/mirror/kubetune-operator:0.1.0"
    finally:
        for name in made:
            control_plane.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


# ---------------------------------------------------------------------------------------------------
# helm
# ---------------------------------------------------------------------------------------------------


def test_helm_install_creates_the_release(control_plane: ControlPlane, helm: Helm, release: Release) -> None:
    status = json.loads(helm("status", release.name, f"--namespace={release.namespace}", "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    full = release.service_account
    for kind, name, ns in [
        ("deployment", full, release.namespace),
        ("serviceaccount", full, release.namespace),
        ("service", f"{full}-metrics", release.namespace),
        ("role", f"{full}-leader-election", release.namespace),
        ("rolebinding", f"{full}-leader-election", release.namespace),
        ("clusterrole", full, None),
        ("clusterrolebinding", full, None),
        ("clusterrole", f"{full}-edit", None),
        ("clusterrole", f"{full}-view", None),
        ("configmap", f"{full}-policy", release.namespace),
        ("role", f"{full}-policy-reader", release.namespace),
        ("rolebinding", f"{full}-policy-reader", release.namespace),
        ("validatingadmissionpolicy", f"{full}-author-access", None),
        ("validatingadmissionpolicy", f"{full}-limits", None),
        ("validatingadmissionpolicybinding", f"{full}-author-access", None),
        ("validatingadmissionpolicybinding", f"{full}-limits", None),
    ]:
        args = ["get", kind, name, *([f"--namespace={ns}"] if ns else [])]
        assert control_plane.kubectl(*args).returncode == 0, f"{kind} {name} is missing"
    deployment = control_plane.get("deployment", full, f"--namespace={release.namespace}")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == full


def test_chart_defaults_pass_server_validation_and_restricted_pod_security(
    control_plane: ControlPlane, helm: Helm, release: Release
) -> None:
    """The default rendering, CRD included, as the API server sees it, in a namespace that warns on
    anything the "restricted" Pod Security Standard forbids."""
    rendered = helm("template", f"{release.name}-dry", str(CHART), f"--namespace={release.namespace}").stdout
    proc = control_plane.kubectl(
        "apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-", input=rendered
    )
    assert proc.returncode == 0, proc.stderr
    assert "PodSecurity" not in proc.stderr, proc.stderr
    assert "customresourcedefinition.apiextensions.k8s.io/finetunejobs.kubetune.io" in proc.stdout


def test_operator_with_the_charts_credentials_runs_a_job_to_success(
    control_plane: ControlPlane, release: Release, caplog: pytest.LogCaptureFixture
) -> None:
    cp, ns = control_plane, release.watched
    whoami = json.loads(as_operator(cp, release, "auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{release.namespace}:{release.service_account}"
    )
    cp.kubectl(
        "create",
        "secret",
        "generic",
        "hf-token",
        f"--namespace={ns}",
        f"--from-literal=token={FAKE_TOKEN}",
        check=True,
    )

    caplog.set_level(logging.INFO, logger="kubetune.operator")
    kube = Kube(load_client(str(release.kubeconfig)))
    # The chart's default grant is cluster-wide: the operator may list (and watch) everywhere. Here it
    # watches one namespace only, so it never touches other tests' FineTuneJobs.
    for kind, selector in (("FineTuneJob", None), ("Job", MANAGED), ("Pod", MANAGED)):
        items, _, _ = kube.list_page(kind, None, selector)
        assert isinstance(items, list)
    # The policy ConfigMap too, as the Deployment's --policy-configmap says: listed and watched by name.
    policy = (release.namespace, f"{release.service_account}-policy")
    op = Operator(kube, namespace=ns, workers=2, policy_configmap=policy).start()
    try:
        assert op.wait_synced(30), "the watches did not list with the chart's credentials"

        def ftj(body: dict[str, Any]) -> str:
            doc = {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "installed", "namespace": ns},
                "spec": body,
            }
            return json.dumps(doc)

        def status() -> dict[str, Any]:
            obj: dict[str, Any] = cp.get("ftj", "installed", f"--namespace={ns}")
            return obj.get("status") or {}

        def wait_state(state: str, timeout: float = 60) -> dict[str, Any]:
            def check() -> dict[str, Any] | None:
                s = status()
                assert s.get("state") == state, f"state {s.get('state')}: {s.get('message')}"
                return s

            return poll(check, timeout=timeout, what=f"FineTuneJob installed to be {state}")

        def jobs() -> list[str]:
            items = cp.get("jobs", f"--namespace={ns}", "--selector=kubetune.io/finetunejob=installed")[
                "items"
            ]
            return sorted(j["metadata"]["name"] for j in items if not j["metadata"].get("deletionTimestamp"))

        # Two nodes: a ConfigMap, a headless Service and an Indexed Job (create).
        two_nodes = {"gpusPerNode": 1, "gpuType": "NVIDIA-A100-SXM4-80GB", "memory": "16Gi", "nodes": 2}
        body = spec(resources=two_nodes, podMetadata={"annotations": SLOW})
        cp.kubectl("apply", "-f", "-", input=ftj(body), check=True)
        running = wait_state("Running")
        first = running["jobName"]
        assert cp.kubectl("get", "service", first, f"--namespace={ns}").returncode == 0
        assert cp.kubectl("get", "configmap", first, f"--namespace={ns}").returncode == 0
        # The workspace claim (create, get): shared by both pods, so ReadWriteMany.
        claim = cp.get("persistentvolumeclaim", "installed-workspace", f"--namespace={ns}")
        assert (
            claim["spec"]["accessModes"] == ["ReadWriteMany"]
            and running["workspaceClaim"] == "installed-workspace"
        )

        # Suspend: the operator patches its Job.
        paused = copy.deepcopy(body)
        paused["runPolicy"] = {"suspend": True}
        cp.kubectl("apply", "-f", "-", input=ftj(paused), check=True)
        wait_state("Suspended")
        assert cp.get("job", first, f"--namespace={ns}")["spec"]["suspend"] is True

        # Edit the spec: the old run's Job, Service and ConfigMap are deleted, a new run finishes.
        edited = spec(
            resources=two_nodes,
            training={"learningRate": 1e-4},
            podMetadata={"annotations": {"pod-complete.stage.kwok.x-k8s.io/delay": "2s"}},
        )
        cp.kubectl("apply", "-f", "-", input=ftj(edited), check=True)
        done = wait_state("Succeeded", timeout=90)
        assert done["jobName"] != first
        poll(lambda: jobs() == [done["jobName"]], timeout=30, what="only the new run's Job")
        for kind in ("service", "configmap"):
            assert cp.kubectl("get", kind, first, f"--namespace={ns}").returncode != 0, f"old {kind} kept"

        # Events (create) from the operator.
        events = cp.get("events", f"--namespace={ns}", "--field-selector=involvedObject.name=installed")
        reasons = {e["reason"] for e in events["items"] if e.get("reportingComponent") == "kubetune-operator"}
        assert {"RunCreated", "RunReplaced"} <= reasons, reasons
    finally:
        op.stop()
    refused = [m for r in caplog.records if "403" in (m := r.getMessage()) or "forbidden" in m.lower()]
    assert not refused, refused


def rules_review(kubeconfig: Path, namespace: str) -> set[Rule]:
    api = client.AuthorizationV1Api(load_client(str(kubeconfig)))
    resp = api.create_self_subject_rules_review({"spec": {"namespace": namespace}}, _preload_content=False)
    status = json.loads(resp.data)["status"]
    assert not status.get("incomplete"), status.get("evaluationError")
    return expand(
        {k: r[k] for k in ("apiGroups", "resources", "verbs", "resourceNames") if k in r}
        for r in status.get("resourceRules") or []
    )


def test_chart_grants_nothing_more(control_plane: ControlPlane, release: Release) -> None:
    cp = control_plane
    # Secrets: never listed or watched anywhere. `get` is granted for the metadata-only check that a
    # FineTuneJob's Hub token Secret exists (secretPreCheck.enabled, the default).
    for args in (
        ["get", "secrets", f"--namespace={release.other}"],
        ["get", "secrets", f"--namespace={release.watched}"],
        ["get", "secrets", "--all-namespaces"],
    ):
        proc = as_operator(cp, release, *args)
        assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), (args, proc.stdout, proc.stderr)

    # Everything the token may do, less what any authenticated user may do, is exactly the chart's
    # rules: the operator's in every namespace, and the Lease's in its own.
    policy = f"{release.service_account}-policy"
    policy_rules = {("", "configmaps", verb, policy) for verb in ("list", "watch")}
    for ns, expected in (
        (release.watched, OPERATOR_RULES),
        (release.other, OPERATOR_RULES),
        (release.namespace, OPERATOR_RULES | LEADER_ELECTION_RULES | policy_rules),
    ):
        extra = rules_review(release.kubeconfig, ns) - rules_review(release.baseline, ns)
        assert extra == expected, f"in {ns}: {sorted(extra ^ expected)}"

    def can_i(*args: str) -> bool:
        out = as_operator(cp, release, "auth", "can-i", *args).stdout.strip()
        assert out in ("yes", "no"), out
        return out == "yes"

    w, o = f"--namespace={release.watched}", f"--namespace={release.other}"
    granted = [
        ("list", "finetunejobs.kubetune.io", "--all-namespaces"),
        ("patch", "finetunejobs.kubetune.io", "--subresource=status", w),
        ("create", "jobs.batch", w),
        ("delete", "jobs.batch", w),
        ("watch", "pods", "--all-namespaces"),
        ("create", "configmaps", w),
        ("create", "persistentvolumeclaims", w),
        ("watch", "persistentvolumeclaims", "--all-namespaces"),  # the informer's
        ("get", "pods", "--subresource=log", w),
        ("get", "secrets", w),
        ("create", "events", w),
        ("update", f"leases.coordination.k8s.io/{LEASE}", f"--namespace={release.namespace}"),
        ("list", f"configmaps/{policy}", f"--namespace={release.namespace}"),
        ("watch", f"configmaps/{policy}", f"--namespace={release.namespace}"),
    ]
    refused = [
        ("list", "secrets", "--all-namespaces"),
        ("list", "secrets", w),
        ("watch", "secrets", w),
        ("update", "secrets", w),
        ("update", "persistentvolumeclaims", w),
        ("create", "pods", "--subresource=exec", w),
        ("create", "pods", w),
        ("delete", "pods", w),
        ("patch", "pods", w),
        ("get", "jobs.batch", w),
        ("update", "jobs.batch", w),
        ("get", "configmaps", w),
        ("get", "finetunejobs.kubetune.io", w),  # the operator reads its cache, never one object
        ("create", "finetunejobs.kubetune.io", w),
        ("patch", "finetunejobs.kubetune.io", w),
        ("delete", "finetunejobs.kubetune.io", w),
        ("create", "deployments.apps", w),
        ("get", "nodes"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("bind", "clusterroles.rbac.authorization.k8s.io"),
        ("escalate", "roles.rbac.authorization.k8s.io", w),
        ("create", "rolebindings.rbac.authorization.k8s.io", o),
        ("impersonate", "serviceaccounts", w),
        ("create", "serviceaccounts/token", w),
        ("create", "leases.coordination.k8s.io", w),
        ("get", "leases.coordination.k8s.io/another-lease", f"--namespace={release.namespace}"),
        ("delete", f"leases.coordination.k8s.io/{LEASE}", f"--namespace={release.namespace}"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        # The policy: readable by name only, never writable, and the admission policies are not its.
        ("get", f"configmaps/{policy}", f"--namespace={release.namespace}"),
        ("update", f"configmaps/{policy}", f"--namespace={release.namespace}"),
        ("list", "configmaps", f"--namespace={release.namespace}"),
        ("list", f"configmaps/{policy}", w),
        ("delete", "validatingadmissionpolicybindings.admissionregistration.k8s.io"),
    ]
    assert [args for args in granted if not can_i(*args)] == []
    assert [args for args in refused if can_i(*args)] == []


def test_leader_election_lease_with_the_charts_credentials(
    control_plane: ControlPlane, release: Release
) -> None:
    """The calls leader election makes (read, create, replace on one Lease) work; others do not."""
    api = client.CoordinationV1Api(load_client(str(release.kubeconfig)))
    ns = release.namespace
    control_plane.kubectl("delete", "lease", LEASE, f"--namespace={ns}", "--ignore-not-found", check=True)
    with pytest.raises(ApiException) as missing:
        api.read_namespaced_lease(LEASE, ns)
    assert missing.value.status == 404  # allowed, and not there yet
    body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEASE, "namespace": ns},
        "spec": {"holderIdentity": "e2e", "leaseDurationSeconds": 15},
    }
    api.create_namespaced_lease(ns, body)
    lease = json.loads(api.read_namespaced_lease(LEASE, ns, _preload_content=False).data)
    lease["spec"]["holderIdentity"] = "e2e-2"
    api.replace_namespaced_lease(LEASE, ns, lease)
    assert (
        json.loads(api.read_namespaced_lease(LEASE, ns, _preload_content=False).data)["spec"][
            "holderIdentity"
        ]
        == "e2e-2"
    )

    calls: list[Callable[[], Any]] = [
        lambda: api.delete_namespaced_lease(LEASE, ns),
        lambda: api.read_namespaced_lease("another-lease", ns),
        lambda: api.create_namespaced_lease(release.watched, {**body, "metadata": {"name": LEASE}}),
        lambda: api.list_namespaced_lease(ns),
    ]
    for call in calls:
        with pytest.raises(ApiException) as refused:
            call()
        assert refused.value.status == 403
    control_plane.kubectl("delete", "lease", LEASE, f"--namespace={ns}", "--ignore-not-found", check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def test_the_charts_operator_command_runs_with_its_credentials(
    control_plane: ControlPlane, helm: Helm, release: Release, tmp_path: Path
) -> None:
    """`kubetune-operator` with the installed Deployment's exact arguments (leader election and metrics
    on), the chart's ServiceAccount token and POD_NAMESPACE as the Downward API sets it: it wins the
    Lease, turns ready and serves metrics, and nothing it does is refused."""
    cp, ns = control_plane, release.namespace
    manifest = helm("get", "manifest", release.name, f"--namespace={ns}").stdout
    [deployment] = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment"]
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["kubetune-operator"]
    health, metrics = free_port(), free_port()
    args = [
        a.replace("0.0.0.0:8080", f"127.0.0.1:{health}").replace("0.0.0.0:8081", f"127.0.0.1:{metrics}")
        for a in c["args"]
    ]
    assert f"--health-addr=127.0.0.1:{health}" in args and f"--metrics-addr=127.0.0.1:{metrics}" in args
    assert "--leader-elect" in args
    cp.kubectl("delete", "lease", LEASE, f"--namespace={ns}", "--ignore-not-found", check=True)
    log_path = tmp_path / "operator.log"
    # Watch one namespace only (the Deployment watches all): other tests' FineTuneJobs are theirs.
    cmd = [sys.executable, "-m", "kubetune_operator", *args, f"--kubeconfig={release.kubeconfig}"]
    cmd.append(f"--namespace={release.watched}")
    env = {
        **os.environ,
        "POD_NAMESPACE": ns,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:

        def lease_holder() -> str | None:
            got = cp.kubectl("get", "lease", LEASE, f"--namespace={ns}", "-o", "json")
            assert got.returncode == 0, "no Lease yet"
            holder = json.loads(got.stdout)["spec"].get("holderIdentity")
            return str(holder) if holder else None

        poll(
            lambda: proc.poll() is None and lease_holder(), timeout=30, what="the operator to take the Lease"
        )
        poll(
            lambda: proc.poll() is None and http_get(f"http://127.0.0.1:{health}/readyz")[0] == 200,
            timeout=30,
            what="/readyz",
        )
        assert http_get(f"http://127.0.0.1:{health}/healthz")[0] == 200
        code, text = http_get(f"http://127.0.0.1:{metrics}/metrics")
        assert code == 200 and "# TYPE" in text, text[:500]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    output = log_path.read_text()
    assert rc == 0, output[-3000:]
    # A 403 as a status, not as digits of a port it was given ("metrics on port 40345").
    assert not re.search(r"(?<!\d)403(?!\d)", output) and "forbidden" not in output.lower(), output[-3000:]
    cp.kubectl("delete", "lease", LEASE, f"--namespace={ns}", "--ignore-not-found", check=True)


def test_trainer_pods_get_no_grant(control_plane: ControlPlane, release: Release) -> None:
    """Trainer pods run as their namespace's default ServiceAccount, without a token; the chart grants
    that account nothing (progress travels through the trainer's log, which the operator reads)."""

    def can(verb: str, resource: str, ns: str) -> bool:
        proc = control_plane.kubectl(
            "auth", "can-i", verb, resource, f"--namespace={ns}", f"--as=system:serviceaccount:{ns}:default"
        )
        return proc.stdout.strip() == "yes"

    for verb, resource in (("patch", "pods"), ("get", "pods"), ("get", "secrets"), ("create", "events")):
        assert not can(verb, resource, release.watched), (verb, resource)


def test_helm_uninstall_keeps_no_grant(control_plane: ControlPlane, helm: Helm, crd: None) -> None:
    """A second, short-lived release: after `helm uninstall` its ServiceAccount's cluster-wide grant is
    gone, and the CRD (not the release's) stays."""
    name, ns = f"kt-{secrets.token_hex(3)}", f"e2e-uninstall-{secrets.token_hex(3)}"
    create_namespace(control_plane, ns)
    try:
        helm("install", name, str(CHART), f"--namespace={ns}", "--set=crds.enabled=false")
        assert control_plane.kubectl("get", "clusterrole", f"{name}-kubetune").returncode == 0
        helm("uninstall", name, f"--namespace={ns}", "--wait")
        for kind in ("clusterrole", "clusterrolebinding"):
            assert control_plane.kubectl("get", kind, f"{name}-kubetune").returncode != 0
        assert control_plane.kubectl("get", "crd", "finetunejobs.kubetune.io").returncode == 0
    finally:
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
