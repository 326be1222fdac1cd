"""Multi-tenant policy on the real control plane: what creating a FineTuneJob lets a user do.

The chart's admission objects (two ValidatingAdmissionPolicies and their bindings, the policy ConfigMap,
the roles for people) are rendered with helm and applied, bound to this test's namespace only
(watchNamespace), so other tests' FineTuneJobs are not touched. Users are impersonated from the admin
kubeconfig (`kubectl --as=...`; the API server runs --authorization-mode=Node,RBAC, so CEL's
`authorizer` asks RBAC about the very user who sent the request):
- alice holds only FineTuneJob rights (a RoleBinding to the chart's <fullname>-edit ClusterRole);
- bob holds the same, and `get` on the Secret hf-token;
- carol is a namespace editor (the built-in `edit`), dave a viewer (`view`): FineTuneJob rights reach them
  through aggregation.
Then the operator, without the admission policy, enforces the same limits from the same ConfigMap.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import ControlPlane, poll
from test_operator import Cluster, manifest, spec  # one FineTuneJob spec shape for the e2e tests

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.policy import REFERENCES, PolicyError, check, load
from kubetune_operator.kube import Kube, load_client
from kubetune_operator.operator import Operator

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
BUILD_HELM = ROOT / "hack" / "helm" / "build.sh"
ADMISSION_KINDS = (
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ConfigMap",
    "ClusterRole",
)
ALLOWED = "registry.example.com/ml/"
LIMITS = [
    "--set-json",
    f'policy.allowedImagePrefixes=["{ALLOWED}"]',
    "--set",
    "policy.maxGPUsPerJob=8",
    "--set-json",
    'policy.allowedPriorityClasses=["low"]',
    "--set-json",
    'policy.allowedTolerationKeys=["team-a"]',
    "--set-json",
    'policy.allowedNodeSelectorKeys=["pool"]',
]


@pytest.fixture(scope="module")
def helm_binary() -> Path:
    proc = subprocess.run(
        ["bash", str(BUILD_HELM)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        pytest.fail(
            "cannot build helm with hack/helm/build.sh (it needs Go >= 1.26 and the Go module proxy; "
            f"set KUBETUNE_SKIP_E2E=1 to skip):\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return Path(proc.stdout.strip().splitlines()[-1])


def render(helm: Path, home: Path, release: str, namespace: str, *args: str) -> list[dict[str, Any]]:
    env = {**os.environ, **{f"HELM_{k}_HOME": str(home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    proc = subprocess.run(
        [
            str(helm),
            "template",
            release,
            str(CHART),
            f"--namespace={namespace}",
            "--set=crds.enabled=false",
            *args,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


class Tenant:
    """kubectl as one user, from the admin kubeconfig (impersonation)."""

    def __init__(self, cp: ControlPlane, namespace: str, user: str) -> None:
        self.cp, self.ns, self.user = cp, namespace, user

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl(f"--as={self.user}", f"--namespace={self.ns}", *args, input=input)

    def create(self, body: dict[str, Any], name: str = "tuned", *, dry_run: bool = True) -> tuple[bool, str]:
        """(admitted, what the API server said)."""
        args = ["create", "-f", "-", *(["--dry-run=server"] if dry_run else [])]
        proc = self.kubectl(*args, input=json.dumps(manifest(name, self.ns, body)))
        return proc.returncode == 0, (proc.stdout + proc.stderr).strip()

    def can_i(self, verb: str, resource: str, *args: str) -> bool:
        out = self.kubectl("auth", "can-i", verb, resource, *args).stdout.strip()
        assert out in ("yes", "no"), out
        return out == "yes"


def refused_with(tenant: Tenant, body: dict[str, Any], message: str) -> None:
    admitted, said = tenant.create(body)
    assert not admitted, f"{tenant.user} was admitted: {said}"
    assert message in said, said
    assert "Forbidden" in said, said


def model(namespace: str, body: dict[str, Any]) -> FineTuneJob:
    return FineTuneJob.model_validate(manifest("tuned", namespace, body))


@pytest.fixture
def policy(
    control_plane: ControlPlane,
    crd: None,
    namespace: str,
    helm_binary: Path,
    tmp_path: Path,
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """The chart's admission objects for this namespace only; (fullname, the objects applied)."""
    release = f"kt-{secrets.token_hex(3)}"
    docs = render(helm_binary, tmp_path, release, namespace, f"--set=watchNamespace={namespace}", *LIMITS)
    objects = [
        d for d in docs if d["kind"] in ADMISSION_KINDS and d["metadata"]["name"] != f"{release}-kubetune"
    ]
    assert sorted(d["kind"] for d in objects) == sorted(
        ["ClusterRole", "ClusterRole", "ConfigMap"]
        + ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"] * 2
    )
    try:
        control_plane.apply(*objects)
        yield f"{release}-kubetune", objects
    finally:
        for d in objects:
            if "namespace" not in d["metadata"]:
                control_plane.kubectl(
                    "delete", d["kind"], d["metadata"]["name"], "--ignore-not-found", "--wait=false"
                )


def test_admission_policy_gives_a_tenant_no_power_she_does_not_have(
    control_plane: ControlPlane, namespace: str, policy: tuple[str, list[dict[str, Any]]]
) -> None:
    cp, ns = control_plane, namespace
    fullname, objects = policy
    for name, value in (("hf-token", "hf-token-value"), ("db-password", "s3cr3t-db-password")):
        cp.kubectl(
            "create",
            "secret",
            "generic",
            name,
            f"--namespace={ns}",
            f"--from-literal=token={value}",
            check=True,
        )
    cp.kubectl(
        "create",
        "rolebinding",
        "alice",
        f"--namespace={ns}",
        f"--clusterrole={fullname}-edit",
        "--user=alice",
        check=True,
    )
    cp.kubectl(
        "create",
        "rolebinding",
        "bob",
        f"--namespace={ns}",
        f"--clusterrole={fullname}-edit",
        "--user=bob",
        check=True,
    )
    cp.kubectl(
        "create",
        "role",
        "read-hf-token",
        f"--namespace={ns}",
        "--verb=get",
        "--resource=secrets",
        "--resource-name=hf-token",
        check=True,
    )
    cp.kubectl(
        "create",
        "rolebinding",
        "bob-hf-token",
        f"--namespace={ns}",
        "--role=read-hf-token",
        "--user=bob",
        check=True,
    )
    cp.kubectl(
        "create",
        "rolebinding",
        "carol",
        f"--namespace={ns}",
        "--clusterrole=edit",
        "--user=carol",
        check=True,
    )
    cp.kubectl(
        "create", "rolebinding", "dave", f"--namespace={ns}", "--clusterrole=view", "--user=dave", check=True
    )
    alice, bob, carol, dave = (Tenant(cp, ns, u) for u in ("alice", "bob", "carol", "dave"))
    assert (
        not alice.can_i("get", "secrets")
        and not alice.can_i("create", "pods")
        and not alice.can_i("create", "jobs")
    )
    assert alice.can_i("create", "finetunejobs.kubetune.io")

    # A Secret she cannot read: refused, with the Secret, the reason and the fix; never its value.
    stolen = spec(output={"hub": {"repoId": "org/x", "token": {"secretKeyRef": {"name": "db-password"}}}})
    refs = {r.field.split(".secretKeyRef")[0]: r for r in REFERENCES}
    secret_ref, claim_ref = refs["spec.output.hub.token"], refs["spec.storage.claimName"]
    expected = secret_ref.message.text(user="alice", name="db-password", namespace=ns)
    # The policy takes a moment to be loaded by the API server after it is created.
    poll(
        lambda: (r := alice.create(stolen))[0] is False and expected in r[1] and r,
        timeout=30,
        what="the author-access policy to refuse alice's FineTuneJob",
    )
    admitted, said = alice.create(stolen)
    assert not admitted and "ValidatingAdmissionPolicy" in said and "Forbidden" in said
    assert "s3cr3t" not in said
    assert "Ask your namespace admin for get on Secret db-password, or use a Secret you can read" in said

    # The same job from a user who may read its Secret: admitted (dry run, and for real).
    body = spec()  # hf-token, the operator's default image, 1 GPU
    refused_with(alice, body, secret_ref.message.text(user="alice", name="hf-token", namespace=ns))
    admitted, said = bob.create(body)
    assert admitted, said
    admitted, said = bob.create(body, "bobs", dry_run=False)
    assert admitted, said

    # An edit of bob's job by alice would start a new run with bob's Secret: refused. A metadata-only
    # edit starts nothing, and passes.
    patch = json.dumps({"spec": {"training": {"learningRate": 0.0001}}})
    proc = alice.kubectl("patch", "ftj", "bobs", "--type=merge", f"--patch={patch}")
    assert (
        proc.returncode != 0
        and secret_ref.message.text(user="alice", name="hf-token", namespace=ns) in proc.stderr
    )
    assert alice.kubectl("label", "ftj", "bobs", "team=ml").returncode == 0
    assert bob.kubectl("patch", "ftj", "bobs", "--type=merge", f"--patch={patch}").returncode == 0

    # A claim she may not read: not mounted either.
    claimed = spec(storage={"claimName": "someone-elses-data"})
    refused_with(bob, claimed, claim_ref.message.text(user="bob", name="someone-elses-data", namespace=ns))

    # The experiment trackers' Secrets, exactly as the Hub token's: one she may not read is refused (named
    # is enough: the tracker need not be in reportTo), one she may read is admitted.
    for field, settings in (
        (
            "spec.training.trackers.wandb.apiKey",
            {"wandb": {"apiKey": {"secretKeyRef": {"name": "db-password"}}}},
        ),
        (
            "spec.training.trackers.mlflow.password",
            {"mlflow": {"password": {"secretKeyRef": {"name": "db-password"}}}},
        ),
        (
            "spec.training.trackers.mlflow.token",
            {"mlflow": {"token": {"secretKeyRef": {"name": "db-password"}}}},
        ),
    ):
        for report_to in ([], list(settings)):
            tracked = spec(training={"reportTo": report_to, "trackers": settings})
            refused_with(bob, tracked, refs[field].message.text(user="bob", name="db-password", namespace=ns))
    readable = {"wandb": {"apiKey": {"secretKeyRef": {"name": "hf-token"}}}}
    admitted, said = bob.create(spec(training={"reportTo": ["wandb"], "trackers": readable}))
    assert admitted, said

    # The limits: each refused with the operator's own words (kubetune.policy.check).
    [configmap] = [d for d in objects if d["kind"] == "ConfigMap"]
    limits = load(configmap["data"], f"ConfigMap {ns}/{configmap['metadata']['name']}")
    over: list[dict[str, Any]] = [
        {"image": "evil.example/miner:1"},
        {"image": "registry.example.com/ml-other/trainer:1"},
        {"resources": {"gpusPerNode": 8, "nodes": 2, "gpuType": "NVIDIA-A100-SXM4-80GB"}},
        {"resources": {"gpusPerNode": 1, "priorityClassName": "system-node-critical"}},
        {"resources": {"gpusPerNode": 1, "tolerations": [{"operator": "Exists"}]}},
        {
            "resources": {
                "gpusPerNode": 1,
                "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}],
            }
        },
        {"resources": {"gpusPerNode": 1, "nodeSelector": {"kubernetes.io/hostname": "gpu-a100-0"}}},
    ]
    for override in over:
        candidate = spec(**override)
        [message] = check(model(ns, candidate), limits)
        refused_with(bob, candidate, message)
    within = spec(
        image=f"{ALLOWED}trainer:1",
        resources={
            "gpusPerNode": 4,
            "nodes": 2,
            "gpuType": "NVIDIA-A100-SXM4-80GB",
            "priorityClassName": "low",
            "tolerations": [{"key": "team-a", "operator": "Exists"}],
            "nodeSelector": {"pool": "a100"},
        },
    )
    assert check(model(ns, within), limits) == []
    admitted, said = bob.create(within)
    assert admitted, said

    # Namespace editors get FineTuneJobs through aggregation (the controller manager merges the roles).
    poll(
        lambda: carol.can_i("create", "finetunejobs.kubetune.io"),
        timeout=30,
        what="edit to aggregate kubetune-edit",
    )
    admitted, said = carol.create(body)  # `edit` may read Secrets, so hf-token is hers to use
    assert admitted, said
    poll(
        lambda: dave.can_i("list", "finetunejobs.kubetune.io"),
        timeout=30,
        what="view to aggregate kubetune-view",
    )
    assert dave.can_i("get", "finetunejobs.kubetune.io", "--subresource=status")
    assert dave.kubectl("get", "ftj", "bobs").returncode == 0
    assert not dave.can_i("create", "finetunejobs.kubetune.io") and not dave.can_i(
        "delete", "finetunejobs.kubetune.io"
    )
    admitted, said = dave.create(body)
    assert not admitted and "cannot create resource" in said
    # Only the operator writes status.
    assert carol.can_i("patch", "finetunejobs.kubetune.io")
    assert not carol.can_i("patch", "finetunejobs.kubetune.io", "--subresource=status")

    # The platform team's mistakes fail closed: a misspelt key, then no ConfigMap at all.
    cm = configmap["metadata"]["name"]
    cp.kubectl(
        "patch",
        "configmap",
        cm,
        f"--namespace={ns}",
        "--type=merge",
        '--patch={"data":{"maxGPUs":"4"}}',
        check=True,
    )
    with pytest.raises(PolicyError) as bad:
        load({**configmap["data"], "maxGPUs": "4"}, limits.source)
    poll(lambda: not bob.create(body)[0], timeout=30, what="the misspelt key to refuse everything")
    refused_with(bob, body, str(bad.value))
    cp.kubectl("delete", "configmap", cm, f"--namespace={ns}", check=True)
    poll(lambda: not bob.create(body)[0], timeout=30, what="the missing ConfigMap to refuse everything")
    admitted, said = bob.create(body)
    assert not admitted and "no params found" in said, said
    # Without the limits' binding at all, the author-access policy (which takes no parameter) still
    # refuses alice's stolen Secret, and only that.
    cp.kubectl("delete", "validatingadmissionpolicybinding", f"{fullname}-limits", check=True)
    poll(lambda: bob.create(body)[0], timeout=30, what="the limits binding to be gone")
    refused_with(alice, stolen, expected)


def test_the_operator_enforces_the_same_limits_without_the_policy(
    control_plane: ControlPlane, namespace: str, crd: None, caplog: pytest.LogCaptureFixture
) -> None:
    """No admission policy here: the FineTuneJob is admitted, and the operator refuses to run it
    (Failed/PolicyViolation, no Job), then runs it once the limits allow it, without any spec change."""
    cluster = Cluster(control_plane, namespace)
    ns = namespace
    cluster.kubectl("create", "secret", "generic", "hf-token", "-n", ns, "--from-literal=token=x")
    cluster.kubectl("create", "configmap", "limits", "-n", ns, "--from-literal=maxGPUsPerJob=1")
    caplog.set_level(logging.INFO, logger="kubetune.operator")
    op = Operator(
        Kube(load_client(str(control_plane.kubeconfig))),
        namespace=ns,
        workers=2,
        policy_configmap=(ns, "limits"),
    ).start()
    try:
        assert op.wait_synced(30)
        two = {"gpusPerNode": 2, "gpuType": "NVIDIA-A100-SXM4-80GB", "memory": "16Gi"}
        cluster.apply(manifest("greedy", ns, spec(resources=two)))
        status = cluster.wait_reason("greedy", "Failed", "PolicyViolation")
        message = cluster.condition("greedy", "PolicyViolation")["message"]
        assert message.startswith(
            "spec.resources: 2 GPUs (gpusPerNode 2 x nodes 1) is more than the 1 one FineTuneJob may use "
            f"(maxGPUsPerJob in ConfigMap {ns}/limits); use fewer, or ask your platform team to change "
            f"ConfigMap {ns}/limits"
        ), message
        assert cluster.jobs("greedy") == [] and status.get("jobName")
        events = [(e["type"], e["reason"]) for e in cluster.events("greedy")]
        assert ("Warning", "PolicyViolation") in events

        # The platform team raises the limit: the ConfigMap's watch wakes the FineTuneJob, which runs.
        patch = json.dumps({"data": {"maxGPUsPerJob": "2"}})
        cluster.kubectl("patch", "configmap", "limits", "-n", ns, "--type=merge", f"--patch={patch}")
        cluster.wait("the run's Job", lambda: cluster.jobs("greedy"), timeout=30)
        assert cluster.status("greedy")["state"] in ("Pending", "Running")

        # No ConfigMap: no new run starts (fail closed), and the running one is left alone.
        cluster.kubectl("delete", "configmap", "limits", "-n", ns)
        cluster.apply(manifest("later", ns, spec()))
        cluster.wait_reason("later", "Pending", "PolicyUnavailable")
        assert "does not exist" in cluster.condition("later", "PolicyUnavailable")["message"]
        assert cluster.jobs("later") == [] and cluster.jobs("greedy")
        # Back with no limits at all: it starts.
        cluster.kubectl("create", "configmap", "limits", "-n", ns)
        cluster.wait("the later run's Job", lambda: cluster.jobs("later"), timeout=30)
    finally:
        op.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]
