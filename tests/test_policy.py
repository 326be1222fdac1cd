"""kubetune.policy: the limits on FineTuneJobs, the operator's check, and the admission policies' CEL.

The CEL itself runs in tests/e2e/test_admission_policy.py, against a real API server. Here: the limits
are read as the CEL reads them; each limit's message names the field, the limit and who can change it;
the CEL message expressions render exactly the Python messages; every object a spec names that its
author must be allowed to read is checked; the generated copies in the chart and the kustomize base are
current.
"""

from __future__ import annotations

import copy
import re
import string
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kubetune import policy
from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec, SecretKeySelector
from kubetune.policy import KEYS, REFERENCES, Limits, PolicyError, check, load

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "ConfigMap kubetune-system/kubetune-policy"
ASK = f"ask your platform team to change {SOURCE}"

SPEC: dict[str, Any] = {
    "model": {"id": "meta-llama/Llama-2-7b-hf"},
    "dataset": {"id": "timdettmers/openassistant-guanaco"},
    "output": {"hub": {"repoId": "org/out", "token": {"secretKeyRef": {"name": "hf-token"}}}},
}


def job(**spec: Any) -> FineTuneJob:
    body = copy.deepcopy(SPEC)
    body.update(spec)
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "demo", "namespace": "team-a"},
            "spec": body,
        }
    )


# ---------------------------------------------------------------------------------------------------
# Reading the ConfigMap
# ---------------------------------------------------------------------------------------------------


def test_lists_are_comma_or_newline_separated_and_empty_means_no_limit() -> None:
    limits = load(
        {
            "allowedImagePrefixes": " registry.example.com/ml/,\nghcr.io/kubetune/ \n\n",
            "maxGPUsPerJob": " 8 ",
            "allowedPriorityClasses": "low, batch",
            "allowedTolerationKeys": "",
        },
        SOURCE,
    )
    assert limits == Limits(
        source=SOURCE,
        allowed_image_prefixes=("registry.example.com/ml/", "ghcr.io/kubetune/"),
        max_gpus_per_job=8,
        allowed_priority_classes=("low", "batch"),
    )
    assert load(None, SOURCE) == load({}, SOURCE) == load(dict.fromkeys(KEYS, ""), SOURCE) == Limits(SOURCE)


def test_an_unknown_key_is_an_error_not_a_silently_missing_limit() -> None:
    with pytest.raises(PolicyError) as e:
        load({"allowedImagePrefix": "registry.example.com/"}, SOURCE)
    assert str(e.value) == (
        f'{SOURCE}: unknown key(s) "allowedImagePrefix" (the keys are allowedImagePrefixes, maxGPUsPerJob, '
        "allowedPriorityClasses, allowedTolerationKeys, allowedNodeSelectorKeys); no FineTuneJob passes "
        f"until your platform team fixes {SOURCE}"
    )


@pytest.mark.parametrize("value", ["eight", "-1", "1.5", "1e3", "9999999999"])
def test_max_gpus_must_be_a_whole_number(value: str) -> None:
    with pytest.raises(PolicyError, match=f'maxGPUsPerJob "{re.escape(value)}" is not a whole number'):
        load({"maxGPUsPerJob": value}, SOURCE)


# ---------------------------------------------------------------------------------------------------
# check(): one message per limit, naming the field, the limit and who to ask
# ---------------------------------------------------------------------------------------------------


def test_no_limits_allow_everything() -> None:
    big = job(
        image="anything.example/x:1",
        resources={
            "gpusPerNode": 16,
            "nodes": 128,
            "priorityClassName": "system-cluster-critical",
            "tolerations": [{"operator": "Exists"}],
            "nodeSelector": {"kubernetes.io/hostname": "n1"},
        },
    )
    assert check(big, Limits(SOURCE)) == []


def test_images() -> None:
    limits = Limits(SOURCE, allowed_image_prefixes=("registry.example.com/ml/", "ghcr.io/kubetune/"))
    assert check(job(), limits) == []  # the operator's default image
    assert check(job(image="registry.example.com/ml/trainer:1"), limits) == []
    assert check(job(image="registry.example.com/ml-other/trainer:1"), limits) == [
        'spec.image: "registry.example.com/ml-other/trainer:1" is not allowed: images must start with one '
        f"of registry.example.com/ml/, ghcr.io/kubetune/ (allowedImagePrefixes in {SOURCE}); use such an "
        f"image, or leave spec.image unset for the default trainer image, or {ASK}"
    ]


@pytest.mark.parametrize(
    "resources, violates",
    [
        ({}, False),
        ({"gpusPerNode": 8}, False),
        ({"gpusPerNode": 4, "nodes": 2}, False),
        ({"gpusPerNode": 3, "nodes": 3}, True),
    ],
)
def test_gpus_per_job_count_every_node(resources: dict[str, Any], violates: bool) -> None:
    messages = check(job(resources=resources), Limits(SOURCE, max_gpus_per_job=8))
    assert bool(messages) == violates
    if violates:
        assert messages == [
            "spec.resources: 9 GPUs (gpusPerNode 3 x nodes 3) is more than the 8 one FineTuneJob may use "
            f"(maxGPUsPerJob in {SOURCE}); use fewer, or {ASK}"
        ]


def test_a_zero_gpu_limit_allows_cpu_jobs_only() -> None:
    limits = Limits(SOURCE, max_gpus_per_job=0)
    assert check(job(resources={"gpusPerNode": 0}), limits) == []
    assert len(check(job(), limits)) == 1


def test_priority_classes() -> None:
    limits = Limits(SOURCE, allowed_priority_classes=("low", "batch"))
    assert check(job(), limits) == []
    assert check(job(resources={"priorityClassName": "batch"}), limits) == []
    assert check(job(resources={"priorityClassName": "system-node-critical"}), limits) == [
        'spec.resources.priorityClassName: "system-node-critical" is not allowed: use one of low, batch '
        f"(allowedPriorityClasses in {SOURCE}), or leave it unset, or {ASK}"
    ]


def test_tolerations_and_a_keyless_one_never_passes() -> None:
    limits = Limits(SOURCE, allowed_toleration_keys=("team-a",))
    ok = [{"key": "team-a", "operator": "Exists", "effect": "NoSchedule"}]
    assert check(job(resources={"tolerations": ok}), limits) == []
    bad = [
        *ok,
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"},
        {"operator": "Exists"},
    ]
    assert check(job(resources={"tolerations": bad}), limits) == [
        'spec.resources.tolerations: key(s) "node-role.kubernetes.io/control-plane", "" not allowed: the '
        f"allowed keys are team-a (allowedTolerationKeys in {SOURCE}), and a toleration without a key (it "
        f"tolerates every taint) is never allowed; remove them, or {ASK}"
    ]


def test_node_selector_keys() -> None:
    limits = Limits(SOURCE, allowed_node_selector_keys=("pool",))
    assert check(job(resources={"nodeSelector": {"pool": "a100"}}), limits) == []
    assert check(job(resources={"nodeSelector": {"pool": "a", "kubernetes.io/hostname": "n1"}}), limits) == [
        'spec.resources.nodeSelector: key(s) "kubernetes.io/hostname" not allowed: the allowed keys are pool '
        f"(allowedNodeSelectorKeys in {SOURCE}); remove them, or {ASK}"
    ]


def test_every_violation_is_reported_at_once() -> None:
    limits = Limits(SOURCE, max_gpus_per_job=1, allowed_priority_classes=("low",))
    messages = check(job(resources={"gpusPerNode": 2, "priorityClassName": "high"}), limits)
    assert [m.split(":")[0] for m in messages] == ["spec.resources", "spec.resources.priorityClassName"]


# ---------------------------------------------------------------------------------------------------
# The CEL side
# ---------------------------------------------------------------------------------------------------


def _render_cel(expression: str) -> str:
    """Evaluate a messageExpression whose fields were replaced by string literals: CEL's single-quoted
    strings with backslash escapes and `+` read the same as Python's."""
    assert re.fullmatch(r"(\s*\+?\s*(\('(?:[^'\\]|\\.)*'\)|'(?:[^'\\]|\\.)*'))+\s*", expression), expression
    return str(eval(expression, {"__builtins__": {}}))


@pytest.mark.parametrize(
    "message",
    [
        policy.UNKNOWN_KEYS,
        policy.BAD_MAX_GPUS,
        policy.IMAGE,
        policy.GPUS,
        policy.PRIORITY,
        policy.TOLERATIONS,
        policy.NODE_SELECTOR,
        *[r.message for r in REFERENCES],
    ],
    ids=lambda m: m.template.split(":")[0][:40],
)
def test_cel_messages_say_what_python_says(message: policy.Message) -> None:
    fields = [name for _, name, _, _ in string.Formatter().parse(message.template) if name]
    values = {name: f"<{name} with 'quotes' and \\ >" for name in fields}
    literal = policy.Message(message.template, {n: policy.cel_string(v) for n, v in values.items()})
    assert _render_cel(literal.expression()) == message.text(**values)
    assert set(fields) == set(message.cel), "every field has a CEL expression, and no other"


def _secret_refs(model: type[BaseModel], path: str) -> set[str]:
    """The dotted path of every SecretKeySelector in the model, by its JSON names."""
    out: set[str] = set()
    for name, field in model.model_fields.items():
        here = f"{path}.{field.alias or name}"
        for t in _types(field.annotation):
            if t is SecretKeySelector:
                out.add(f"{here}.name")
            elif isinstance(t, type) and issubclass(t, BaseModel):
                out |= _secret_refs(t, here)
    return out


def _types(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict):
        return [t for arg in typing.get_args(annotation) for t in _types(arg)]
    return [annotation]


def test_every_secret_a_spec_can_name_is_checked_against_its_author() -> None:
    """The API server refuses a FineTuneJob whose author may not `get` a Secret it names: a new
    secretKeyRef in the models fails this test until the author-access policy checks it too."""
    refs = _secret_refs(FineTuneJobSpec, "spec")
    assert refs == {
        "spec.output.hub.token.secretKeyRef.name",
        "spec.training.trackers.mlflow.password.secretKeyRef.name",
        "spec.training.trackers.mlflow.token.secretKeyRef.name",
        "spec.training.trackers.wandb.apiKey.secretKeyRef.name",
    }
    checked = {r.field for r in REFERENCES if r.resource == "secrets"}
    assert refs == checked
    assert {r.field for r in REFERENCES if r.resource == "persistentvolumeclaims"} == {
        "spec.storage.claimName"
    }


def test_variables_are_defined_before_they_are_used() -> None:
    for name, spec in policy.admission_policies().items():
        defined: list[str] = []
        for variable in spec["variables"]:
            used = set(re.findall(r"variables\.(\w+)", variable["expression"]))
            assert used <= set(defined), f"{name}: {variable['name']} uses {used - set(defined)}"
            defined.append(variable["name"])
        for validation in spec["validations"]:
            for key in ("expression", "messageExpression"):
                used = set(re.findall(r"variables\.(\w+)", validation[key]))
                assert used <= set(defined), f"{name}: {key} uses {used - set(defined)}"
    limits = policy.admission_policies()["limits"]
    assert {v["name"] for v in limits["variables"]} >= set(policy.LIST_KEYS) | {policy.MAX_GPUS}


def test_both_policies_check_only_a_new_spec() -> None:
    for spec in policy.admission_policies().values():
        assert spec["failurePolicy"] == "Fail"
        assert spec["matchConstraints"]["resourceRules"] == [
            {
                "apiGroups": ["kubetune.io"],
                "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"],
                "resources": ["finetunejobs"],
            }
        ]
        assert spec["matchConditions"] == [policy.SPEC_CHANGED]
    assert "paramKind" not in policy.admission_policies()["author-access"]


# ---------------------------------------------------------------------------------------------------
# The generated copies
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(policy.generated()), ids=str)
def test_generated_copies_are_current(path: Path) -> None:
    assert (ROOT / path).read_text() == policy.generated()[path], (
        f"{path} is stale: run `python -m kubetune.policy`"
    )


def test_the_configmaps_have_exactly_the_policys_keys() -> None:
    [configmap, *_] = yaml.safe_load_all((ROOT / "manifests/base/policy.yaml").read_text())
    assert (configmap["kind"], configmap["metadata"]["name"]) == ("ConfigMap", policy.BASE_CONFIGMAP)
    assert tuple(configmap["data"]) == KEYS
    assert load(configmap["data"], SOURCE) == Limits(SOURCE)  # the base ships no limits
    values = yaml.safe_load((ROOT / "charts/kubetune/values.yaml").read_text())["policy"]
    assert tuple(k for k in values if k != "create") == KEYS
