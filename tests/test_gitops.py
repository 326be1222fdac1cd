"""The GitOps examples in gitops/: Argo CD health check, Application, Flux objects, GitHub Actions workflow.

The Argo CD health check runs in a real Lua 5.1 interpreter (lupa's `lua51`, the Lua version of Argo CD's
gopher-lua) with only the libraries Argo CD opens (base, table, a safe os: no string, no math, no string
methods), against FineTuneJobs whose status comes from the operator's own `compute_status`, so the script
cannot drift from the status it reads.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

import kubetune
from kubetune.api.generate import crd
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.contract import progress_line
from kubetune.render import render_claim, render_job, spec_hash
from kubetune_operator.plan import Observed, SecretCheck, plan

ROOT = Path(__file__).resolve().parent.parent
GITOPS = ROOT / "gitops"
HEALTH_LUA = GITOPS / "argocd" / "health.lua"
CM_KEY = "resource.customizations.health.kubetune.io_FineTuneJob"
NOW = "2026-11-28T10:00:00Z"
NOW_DT = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
CRD = crd()

# lupa ships no type information; imported by name so that mypy sees a plain module.
lua51: Any = importlib.import_module("lupa.lua51")


# --- Running health.lua the way Argo CD does ------------------------------------------------------------

# Argo CD (util/lua/lua.go) creates an LState with SkipOpenLibs, opens package, base, table and a safe os
# library, sets the global `obj` to the object (maps as tables, lists as 1-indexed tables, null as nil) and
# runs the script; the returned table is the health. Nothing else is there: no `string` or `math` table,
# and no string metatable, so `s:sub(1)` fails as well.
SANDBOX = """
function(script, obj)
  local env = {obj = obj, _VERSION = _VERSION, table = table,
               os = {time = os.time, date = os.date, clock = os.clock, difftime = os.difftime}}
  for _, name in ipairs({"assert", "error", "getmetatable", "ipairs", "next", "pairs", "pcall", "print",
                         "rawequal", "rawget", "rawset", "select", "setmetatable", "tonumber", "tostring",
                         "type", "unpack", "xpcall", "require", "module"}) do
    env[name] = _G[name]
  end
  env._G = env
  getmetatable("").__index = nil
  local chunk = assert(loadstring(script, "=health.lua"))
  setfenv(chunk, env)
  return chunk()
end
"""


def to_lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        table = lua.table()
        for key, item in value.items():
            if item is not None:
                table[key] = to_lua(lua, item)
        return table
    if isinstance(value, list):
        table = lua.table()
        for i, item in enumerate(value, start=1):
            table[i] = to_lua(lua, item)
        return table
    return value


def argo_health(obj: dict[str, Any], script: str | None = None) -> tuple[str, str]:
    lua = lua51.LuaRuntime(unpack_returned_tuples=False)
    # Through JSON, as the object reaches Argo CD: only JSON types.
    hs = lua.eval(SANDBOX)(script or HEALTH_LUA.read_text(), to_lua(lua, json.loads(json.dumps(obj))))
    assert lua.eval("type")(hs) == "table", hs
    assert set(hs.keys()) == {"status", "message"}, list(hs.keys())
    return str(hs["status"]), str(hs["message"])


def test_the_sandbox_is_as_bare_as_argo_cds() -> None:
    for snippet in (
        'return {status = string.upper("x")}',
        'return {status = ("x"):upper()}',
        "return math.max(1)",
    ):
        with pytest.raises(lua51.LuaError):
            argo_health({}, snippet)
    assert argo_health({}, 'return {status = "Healthy", message = table.concat({"a", "b"}, " ")}') == (
        "Healthy",
        "a b",
    )


# --- FineTuneJobs with the operator's status --------------------------------------------------------------


def base(**run_policy: Any) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load((ROOT / "jobs" / "falcon-7b-guanaco-qlora.yaml").read_text())
    obj["metadata"].update(namespace="ml-training", generation=3, uid="0c5e2a", creationTimestamp=NOW)
    obj["spec"]["runPolicy"] = run_policy
    return obj


def trainer_job(conditions: list[dict[str, Any]] | None = None, suspend: bool = False, **status: Any) -> Any:
    return {"spec": {"suspend": suspend}, "status": {"conditions": conditions or [], **status}}


def pod(phase: str, created: str = NOW, **status: Any) -> dict[str, Any]:
    p = {"metadata": {"name": "p", "creationTimestamp": created}, "status": {"phase": phase, **status}}
    if phase == "Running":
        p["status"].setdefault("containerStatuses", [{"name": "trainer", "state": {"running": {}}}])
    return p


def with_status(
    obj: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]] | None = None,
    invalid: str | None = None,
    old: dict[str, Any] | None = None,
    log: str | None = None,
    secret: SecretCheck | None = None,
) -> dict[str, Any]:
    """The object as the operator leaves it: what plan() writes for this observation of the cluster.
    `job` gives the run's Job its suspend flag and status; `old` is the status of an earlier pass."""
    obj = copy.deepcopy(obj)
    if invalid is not None:
        return {**obj, "status": plan(Observed(obj, None, invalid=invalid), NOW_DT).status}
    model = FineTuneJob.model_validate(obj)
    jobs = []
    if job is not None:
        rendered = render_job(model)
        rendered["metadata"]["uid"] = "job-uid"
        rendered["spec"]["suspend"] = job["spec"]["suspend"]
        rendered["status"] = job["status"]
        jobs.append(rendered)
    if old is not None:
        obj["status"] = {"specHash": spec_hash(model), **old}
    obs = Observed(
        obj, model, jobs=jobs, pods=pods or [], claim=render_claim(model), log_tail=log, secret=secret
    )  # type: ignore[arg-type]
    return {**obj, "status": plan(obs, NOW_DT).status}


UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
PROGRESS = progress_line(
    {
        "state": "Training",
        "step": 37,
        "total_steps": 100,
        "loss": 1.23456,
        "eta_seconds": 4330,
        "updated_at": NOW,
    }
)
OOM = [{"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]
FAILED_JOB = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
DISRUPTED = [
    {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler", "message": "x"}
]


def samples() -> dict[str, tuple[dict[str, Any], str, str]]:
    running = with_status(base(), trainer_job(startTime=NOW), [pod("Running")], log=PROGRESS)
    stale = copy.deepcopy(running)
    stale["metadata"]["generation"] = 4
    unschedulable = pod(
        "Pending",
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE}
        ],
    )
    oom_message = (
        "OOMKilled: the trainer used more memory than its limit (resources.memory: 48Gi) and was killed "
        "(OOMKilled): raise resources.memory, or lower training.perDeviceBatchSize and training.maxSeqLength "
        "(smaller batches of shorter rows)"
    )
    return {
        "no status": (base(), "Progressing", "waiting for the operator to pick up this FineTuneJob"),
        "stale observedGeneration": (
            stale,
            "Progressing",
            "waiting for the operator to observe generation 4 (status is of generation 3)",
        ),
        "pending, no pods yet": (
            with_status(base(), trainer_job()),
            "Progressing",
            "pending: waiting for the trainer pods",
        ),
        "pending, scheduled": (
            with_status(base(), trainer_job(), [pod("Pending")]),
            "Progressing",
            "pending: trainer pods are scheduled and starting",
        ),
        "pending, unschedulable": (
            with_status(base(), trainer_job(), [unschedulable]),
            "Progressing",
            f"pending: Unschedulable: {UNSCHEDULABLE}",
        ),
        "pending, secret missing": (
            with_status(base(), None, secret="missing"),
            "Degraded",
            'SecretMissing: the Secret "hf-token" with key "token" (spec.output.hub.token.secretKeyRef) does '
            "not exist in namespace ml-training: create it with `kubectl create secret generic hf-token -n "
            "ml-training --from-literal=token=<Hugging Face token with write access>`; the run starts once "
            "it exists",
        ),
        "running with progress": (running, "Progressing", "running: Training 37% loss 1.2346 eta 1h12m"),
        "running after a preemption": (
            with_status(
                base(),
                trainer_job(startTime=NOW, failed=1),
                [pod("Running")],
                log=PROGRESS,
                old={"state": "Running", "restarts": 1},
            ),
            "Progressing",
            "running: Training 37% loss 1.2346 eta 1h12m restarts 1",
        ),
        "running, replacement of a preempted pod starting": (
            with_status(
                base(),
                trainer_job(startTime=NOW),
                [pod("Failed", conditions=DISRUPTED)],
                old={**running["status"]},
            ),
            "Progressing",
            "running: Training 37% loss 1.2346 eta 1h12m restarts 1; Preempted: trainer pod p was preempted "
            "(PreemptionByScheduler: x); its replacement resumes from the last checkpoint",
        ),
        "running, no report yet": (
            with_status(base(), trainer_job(startTime=NOW), [pod("Running")]),
            "Progressing",
            "running",
        ),
        "suspended by runPolicy": (
            with_status(base(suspend=True), trainer_job(suspend=True)),
            "Suspended",
            "suspended by runPolicy.suspend; resumes from its last checkpoint",
        ),
        "suspended by runPolicy, halfway": (
            with_status(
                base(suspend=True),
                trainer_job(suspend=True),
                old={"progress": "37%", "loss": "1.2346"},
            ),
            "Suspended",
            "suspended by runPolicy.suspend; resumes from its last checkpoint (at 37%)",
        ),
        "queued in Kueue": (
            with_status(base(queueName="a100"), trainer_job(suspend=True)),
            "Progressing",
            "queued: waiting for Kueue to admit the Job (LocalQueue a100)",
        ),
        "succeeded": (
            with_status(
                base(),
                trainer_job([{"type": "Complete", "status": "True"}], completionTime=NOW),
                [pod("Succeeded")],
                old={**running["status"], "loss": "0.9812"},
            ),
            "Healthy",
            "training finished, loss 0.9812",
        ),
        "failed, oom after retries": (
            with_status(base(), trainer_job(FAILED_JOB, failed=4), [pod("Failed", containerStatuses=OOM)]),
            "Degraded",
            oom_message,
        ),
        "failed, invalid spec": (
            with_status(base(), None, invalid="spec.method: qlora needs 4-bit quantization"),
            "Degraded",
            "InvalidSpec: spec.method: qlora needs 4-bit quantization",
        ),
    }


SAMPLES = samples()


@pytest.mark.parametrize("name", list(SAMPLES))
def test_argo_health(name: str) -> None:
    obj, health, message = SAMPLES[name]
    assert argo_health(obj) == (health, message)


def _strict(node: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "properties" in node:
        node["additionalProperties"] = False
        node["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
    if "items" in node:
        node["items"] = _strict(node["items"])
    return node


STATUS_SCHEMA = _strict(CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"])


@pytest.mark.parametrize("name", [n for n in SAMPLES if "status" in SAMPLES[n][0]])
def test_samples_have_the_crds_status_shape(name: str) -> None:
    """What the health check is tested on is what the API server would store."""
    jsonschema.Draft4Validator(STATUS_SCHEMA).validate(SAMPLES[name][0]["status"])


def test_every_state_is_covered() -> None:
    states = {obj["status"]["state"] for obj, _, _ in SAMPLES.values() if "status" in obj}
    assert states == set(STATUS_SCHEMA["properties"]["state"]["enum"])


def test_unknown_state_and_odd_shapes_do_not_break_the_script() -> None:
    obj = SAMPLES["running with progress"][0]
    assert argo_health({**obj, "status": {**obj["status"], "state": "Exploded"}}) == (
        "Unknown",
        "unknown state Exploded",
    )
    bare_failed = {
        "metadata": {"name": "x", "generation": 1},
        "status": {"state": "Failed", "observedGeneration": 1},
    }
    assert argo_health(bare_failed) == ("Degraded", "the run failed")
    no_generation = {"metadata": {"name": "x"}, "spec": {}, "status": {"state": "Pending"}}
    assert argo_health(no_generation) == ("Progressing", "pending: waiting for the trainer pods")


def test_health_lua_is_lua_5_1_without_string_or_math() -> None:
    code = "\n".join(line.split("--")[0] for line in HEALTH_LUA.read_text().splitlines())
    for forbidden in ("string.", "math.", "goto", "//", "utf8.", "require", "io.", "debug."):
        assert forbidden not in code, forbidden
    assert not re.search(r"\w\s*:\s*\w+\s*\(", code), "method calls on strings need the string library"


# --- argocd-cm patch and Application ----------------------------------------------------------------------


def load(path: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((GITOPS / path).read_text()) if d is not None]


def test_every_yaml_file_parses() -> None:
    files = sorted(GITOPS.rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(f.read_text()) if d is not None), f


def test_argocd_cm_patch_carries_the_same_script() -> None:
    (cm,) = load("argocd/argocd-cm-patch.yaml")
    assert (cm["apiVersion"], cm["kind"], cm["metadata"]["name"], cm["metadata"]["namespace"]) == (
        "v1",
        "ConfigMap",
        "argocd-cm",
        "argocd",
    )
    group, kind = CRD["spec"]["group"], CRD["spec"]["names"]["kind"]
    assert f"resource.customizations.health.{group}_{kind}" == CM_KEY
    assert cm["data"][CM_KEY] == HEALTH_LUA.read_text(), (
        "gitops/argocd/argocd-cm-patch.yaml must hold health.lua verbatim (indented by 4 spaces)"
    )


def test_argocd_application() -> None:
    (app,) = load("argocd/application.yaml")
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert "finalizers" not in app["metadata"], "deleting the Application must not delete the runs"
    spec = app["spec"]
    assert spec["project"] and spec["source"]["repoURL"] and spec["source"]["targetRevision"]
    assert spec["source"]["path"] == "jobs"
    assert spec["source"]["directory"] == {"recurse": False, "include": "{*.yaml,*.yml}"}
    assert spec["destination"]["server"] and spec["destination"]["namespace"]
    policy = spec["syncPolicy"]
    assert policy["automated"] == {"prune": False, "selfHeal": True}
    assert "ServerSideApply=true" in policy["syncOptions"]
    assert {"group": "kubetune.io", "kind": "FineTuneJob", "jsonPointers": ["/status"]} in spec[
        "ignoreDifferences"
    ]


# --- Flux -------------------------------------------------------------------------------------------------


def flux_objects() -> tuple[dict[str, Any], dict[str, Any]]:
    repo, ks = load("flux/finetune-jobs.yaml")
    return repo, ks


def test_flux_objects() -> None:
    repo, ks = flux_objects()
    assert (repo["apiVersion"], repo["kind"]) == ("source.toolkit.fluxcd.io/v1", "GitRepository")
    assert repo["spec"]["url"] and repo["spec"]["interval"] and repo["spec"]["ref"]["branch"]
    assert (ks["apiVersion"], ks["kind"]) == ("kustomize.toolkit.fluxcd.io/v1", "Kustomization")
    spec = ks["spec"]
    assert spec["sourceRef"] == {"kind": "GitRepository", "name": repo["metadata"]["name"]}
    assert ks["metadata"]["namespace"] == repo["metadata"]["namespace"]
    assert spec["path"] == "./jobs" and spec["interval"] and spec["targetNamespace"]
    assert spec["prune"] is False
    assert spec["wait"] is True and spec["timeout"]
    (check,) = spec["healthCheckExprs"]
    assert check["apiVersion"] == f"{CRD['spec']['group']}/{CRD['spec']['versions'][0]['name']}"
    assert check["kind"] == CRD["spec"]["names"]["kind"]
    # kustomize reserves this name for its own config; a Flux object in it would not be applied.
    assert not (GITOPS / "flux" / "kustomization.yaml").exists()


def flux_health(obj: dict[str, Any]) -> str:
    """Flux's CEL status evaluator (fluxcd/pkg runtime/cel, RFC-0009), with cel-python."""
    if "status" not in obj:
        # cel-go fails on a variable the object lacks ("no such attribute(s): status"); cel-python
        # does not, so that case is spelled out: Flux reports the error and keeps waiting.
        return "Error"
    observed, generation = obj["status"].get("observedGeneration"), obj["metadata"].get("generation")
    if isinstance(observed, int) and isinstance(generation, int) and observed != generation:
        return "InProgress"
    (check,) = flux_objects()[1]["spec"]["healthCheckExprs"]
    env = celpy.Environment()
    activation = {k: celpy.json_to_cel(v) for k, v in obj.items()}
    for key, result in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if check.get(key) and env.program(env.compile(check[key])).evaluate(activation):
            return result
    return "InProgress"


FLUX = {
    "no status": "Error",
    "stale observedGeneration": "InProgress",
    "pending, secret missing": "Failed",
    "failed, oom after retries": "Failed",
    "failed, invalid spec": "Failed",
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_flux_health_agrees_with_argo(name: str) -> None:
    """Failed where Argo CD says Degraded; Current for a job the operator took up that has not failed."""
    obj, argo, _ = SAMPLES[name]
    expected = FLUX.get(name, "Current")
    assert flux_health(obj) == expected
    assert (expected == "Failed") == (argo == "Degraded")


# --- GitHub Actions ---------------------------------------------------------------------------------------


def workflow() -> dict[str, Any]:
    (wf,) = load("github-actions/finetune.yaml")
    raw: dict[Any, Any] = wf
    raw["on"] = raw.pop(True, raw.get("on"))  # YAML 1.1 reads a bare `on` as true
    return wf


def run_lines(job: dict[str, Any]) -> list[str]:
    return [line.strip() for step in job["steps"] for line in str(step.get("run", "")).splitlines()]


def test_workflow_shape() -> None:
    wf = workflow()
    assert set(wf["on"]) == {"pull_request", "push"}
    assert wf["on"]["push"]["branches"] == ["main"]
    assert wf["permissions"] == {"contents": "read"}
    jobs = wf["jobs"]
    assert set(jobs) == {"validate", "server-dry-run", "apply"}
    assert "kubetune validate jobs/" in run_lines(jobs["validate"])
    assert any("--dry-run=server" in line for line in run_lines(jobs["server-dry-run"]))
    assert "pull_request" in jobs["server-dry-run"]["if"] and "push" in jobs["apply"]["if"]
    apply = [line for line in run_lines(jobs["apply"]) if line.startswith("kubectl apply")]
    assert apply == ['kubectl apply --server-side --field-manager=kubetune-ci -n "$NAMESPACE" -f jobs/']
    assert "kubetune validate jobs/" in run_lines(jobs["apply"])
    assert jobs["apply"]["concurrency"]["cancel-in-progress"] is False
    assert not any("--prune" in line for job in jobs.values() for line in run_lines(job))


def test_workflow_pins_actions_and_kubetune() -> None:
    text = (GITOPS / "github-actions" / "finetune.yaml").read_text()
    uses = re.findall(r"uses: (\S+)(.*)", text)
    assert uses
    for ref, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", ref), ref
        assert re.fullmatch(r" # v\d+\.\d+\.\d+", comment), f"{ref}: say which tag the SHA is"
    assert workflow()["env"]["KUBETUNE_VERSION"] == kubetune.__version__, "pin the CLI to this version"


def _kubetune(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    script = shutil.which("kubetune", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-c", "from kubetune.cli import main; main()"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_workflow_validate_passes_on_this_repos_jobs() -> None:
    lines = {line for job in workflow()["jobs"].values() for line in run_lines(job)}
    commands = sorted(line for line in lines if line.startswith("kubetune validate"))
    assert commands == ["kubetune validate jobs/"]
    result = _kubetune(shlex.split(commands[0])[1:], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FineTuneJob(s) valid" in result.stdout


def test_validate_rejects_generate_name(tmp_path: Path) -> None:
    """The README's promise: CI stops a FineTuneJob without a fixed name."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    text = (ROOT / "jobs" / "bloom-lora.yaml").read_text()
    name = yaml.safe_load(text)["metadata"]["name"]
    (jobs / "bloom.yaml").write_text(text.replace(f"name: {name}", f"generateName: {name}-", 1))
    result = _kubetune(["validate", "jobs/"], tmp_path)
    assert result.returncode == 1 and "metadata.name: required field is missing" in result.stdout
