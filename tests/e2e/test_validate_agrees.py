"""`kubetune validate` is exactly as strict as the API server with the generated CRD.

Each case is YAML text with one odd value in an otherwise valid FineTuneJob. The real API server decides
(`kubectl create --dry-run=server -f -`, so kubectl's own YAML parser is in the loop: `y` is a boolean
there, `1e3` a number, `2024-01-01` text), and `validate_paths` must accept exactly what it accepts.
Where the two differ on purpose, DIFFERENCES names the case and says why; a listed difference that goes
away fails too, so the list stays true.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from controlplane import ControlPlane

from kubetune.api.load import validate_paths

pytestmark = pytest.mark.e2e

TOKEN = "hf_" + "AgreeNeverLeaks0123456789abcdef"
SENTINEL = "__ODD_VALUE__"

BASE = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "agree"},
    "spec": {
        "model": {"id": "tiiuae/falcon-7b"},
        "dataset": {"id": "timdettmers/openassistant-guanaco"},
        "resources": {"gpusPerNode": 1, "memory": "16Gi"},
        "output": {"hub": {"repoId": "org/falcon-qlora", "token": {"secretKeyRef": {"name": "hf-token"}}}},
    },
}


@dataclass(frozen=True)
class Case:
    id: str
    path: str  # dotted, where the odd value goes
    text: str  # the value, as YAML text


def _cases() -> list[Case]:
    c: list[tuple[str, str, str]] = [
        # Integers (training.maxSteps).
        ("int", "spec.training.maxSteps", "500"),
        ("int-quoted", "spec.training.maxSteps", '"500"'),
        ("int-true", "spec.training.maxSteps", "true"),
        ("int-5.0", "spec.training.maxSteps", "5.0"),
        ("int-5.5", "spec.training.maxSteps", "5.5"),
        ("int-1e3", "spec.training.maxSteps", "1e3"),
        ("int-1.0e+3", "spec.training.maxSteps", "1.0e+3"),
        ("int-hex", "spec.training.maxSteps", "0x10"),
        ("int-octal-0o", "spec.training.maxSteps", "0o17"),
        ("int-underscores", "spec.training.maxSteps", "1_000"),
        ("int-sexagesimal", "spec.training.maxSteps", "190:20:30"),
        ("int64-max", "spec.training.maxSteps", "9223372036854775807"),
        ("int64-max+1", "spec.training.maxSteps", "9223372036854775808"),
        ("int-1e19", "spec.training.maxSteps", "1e19"),
        ("int-below-minimum", "spec.training.maxSteps", "0"),
        ("int-inf", "spec.training.maxSteps", ".inf"),
        ("int-null", "spec.training.maxSteps", "~"),
        ("int32-past", "spec.runPolicy.backoffLimit", "2147483648"),
        # Numbers (training.learningRate).
        ("float-exponent", "spec.training.learningRate", "2e-4"),
        ("float-quoted", "spec.training.learningRate", '"2e-4"'),
        ("float-int", "spec.training.learningRate", "1"),
        ("float-inf", "spec.training.learningRate", ".inf"),
        ("float-nan", "spec.training.learningRate", ".nan"),
        ("float-bool", "spec.training.learningRate", "true"),
        ("float-1e400", "spec.training.learningRate", "1e400"),
        # Booleans (model.trustRemoteCode).
        ("bool-no", "spec.model.trustRemoteCode", "no"),
        ("bool-no-quoted", "spec.model.trustRemoteCode", '"no"'),
        ("bool-y", "spec.model.trustRemoteCode", "y"),
        ("bool-off", "spec.model.trustRemoteCode", "off"),
        ("bool-1", "spec.model.trustRemoteCode", "1"),
        ("bool-True", "spec.model.trustRemoteCode", "True"),
        # Enums (training.packing was a boolean before bfd).
        ("packing-true", "spec.training.packing", "true"),
        ("packing-quoted-true", "spec.training.packing", '"true"'),
        ("packing-bfd", "spec.training.packing", "bfd"),
        ("packing-BFD", "spec.training.packing", "BFD"),
        # Strings (dataset.revision).
        ("str-date", "spec.dataset.revision", "2024-01-01"),
        ("str-number", "spec.dataset.revision", "1234"),
        ("str-quoted-number", "spec.dataset.revision", '"1234"'),
        ("str-binary", "spec.dataset.revision", "!!binary bWFpbg=="),
        ("str-yes", "spec.dataset.revision", "yes"),
        # Quantities.
        ("qty-64mi", "spec.resources.memory", "64mi"),
        ("qty-negative", "spec.resources.memory", "-64Gi"),
        ("qty-1e3-number", "spec.resources.memory", "1e3"),
        ("qty-1e3-string", "spec.resources.memory", '"1e3"'),
        ("qty-0.5Gi", "spec.resources.memory", "0.5Gi"),
        ("qty-zero", "spec.resources.memory", '"0"'),
        ("qty-plus", "spec.resources.memory", "+1Gi"),
        ("qty-dot", "spec.resources.memory", '"5."'),
        ("qty-leading-dot", "spec.resources.memory", '".5"'),
        ("qty-space", "spec.resources.memory", '" 1Gi"'),
        ("qty-1K", "spec.resources.memory", "1K"),
        ("qty-exponent-E", "spec.resources.memory", "1E3"),
        ("qty-micro", "spec.resources.cpu", "100u"),
        ("qty-cpu-unquoted", "spec.resources.cpu", "8"),
        ("qty-storage-tiny", "spec.storage.size", "1n"),
        # Labels, annotations, node selectors.
        ("label-value-space", "spec.podMetadata.labels", '{team: "a b"}'),
        ("label-value-chars", "spec.podMetadata.labels", "{team: a.b_c-D}"),
        ("label-value-64", "spec.podMetadata.labels", "{team: " + "a" * 64 + "}"),
        ("label-key-upper-prefix", "spec.podMetadata.labels", '{"Example.com/x": y1}'),
        ("annotation-key-upper-prefix", "spec.podMetadata.annotations", '{"Example.com/x": y1}'),
        ("annotation-key-bad", "spec.podMetadata.annotations", '{"a/b/c": x}'),
        ("label-int-key", "spec.podMetadata.labels", "{5: x}"),
        ("label-bool-value", "spec.podMetadata.labels", "{a: yes}"),
        ("label-null-value", "spec.podMetadata.labels", "{a: ~}"),
        ("node-selector-hostname", "spec.resources.nodeSelector", '{"kubernetes.io/hostname": node-1}'),
        ("node-selector-bad-value", "spec.resources.nodeSelector", "{zone: -east}"),
        # Tolerations.
        ("tol-exists-with-value", "spec.resources.tolerations", "[{key: k, operator: Exists, value: x}]"),
        (
            "tol-seconds-no-effect",
            "spec.resources.tolerations",
            "[{key: k, operator: Exists, tolerationSeconds: 5}]",
        ),
        (
            "tol-seconds-noexecute",
            "spec.resources.tolerations",
            "[{key: k, operator: Exists, effect: NoExecute, tolerationSeconds: 5}]",
        ),
        ("tol-no-key-equal", "spec.resources.tolerations", "[{operator: Equal, value: v}]"),
        ("tol-no-key-exists", "spec.resources.tolerations", "[{operator: Exists}]"),
        # Names.
        ("name-dot", "metadata.name", "my.job"),
        ("name-50", "metadata.name", "a" * 50),
        ("name-51", "metadata.name", "a" * 51),
        ("name-digit-first", "metadata.name", '"7b-tune"'),
        ("queue-63", "spec.runPolicy.queueName", "q" * 63),
        ("queue-64", "spec.runPolicy.queueName", "q" * 64),
        ("secret-name-upper", "spec.output.hub.token.secretKeyRef.name", "HF-TOKEN"),
        # Hub repository ids.
        ("hub-double-dash", "spec.output.hub.repoId", "org/a--b"),
        ("hub-dot-git", "spec.output.hub.repoId", "org/model.git"),
        ("hub-96", "spec.output.hub.repoId", "org/" + "a" * 96),
        ("hub-97", "spec.output.hub.repoId", "org/" + "a" * 97),
        ("hub-underscores", "spec.output.hub.repoId", "_org/_m_"),
        ("hub-three-parts", "spec.model.id", "a/b/c"),
        # Paths.
        ("mount-spec", "spec.storage.mountPath", "/etc/kubetune"),
        ("mount-trailing-slash", "spec.storage.mountPath", "/workspace/"),
        ("mount-dev", "spec.storage.mountPath", "/dev"),
        ("output-relative-up", "spec.output.path", "../out"),
        ("output-in-shm", "spec.output.path", "/dev/shm/x"),
        # Lengths are characters, not bytes.
        ("prompt-16384-accented", "spec.samples.prompts", "[" + "é" * 16384 + "]"),
        ("prompt-16385", "spec.samples.prompts", "[" + "a" * 16385 + "]"),
        # Tokens.
        ("token-in-prompt", "spec.samples.prompts", f"[{TOKEN}]"),
        ("token-as-annotation-key", "spec.podMetadata.annotations", f"{{{TOKEN}: x}}"),
        ("token-in-base64", "spec.samples.prompts", f"[{base64.b64encode(TOKEN.encode()).decode()}]"),
        ("token-in-metadata", "metadata.annotations", f"{{note: {TOKEN}}}"),
        # Issue 11: loss tokens, templates, mixes, trackers, lineage.
        ("train-on-text-completion", "spec.dataset", "{id: org/d, trainOn: completion}"),
        ("train-on-chat-assistant", "spec.dataset", "{id: org/d, format: chat, trainOn: assistant}"),
        ("chat-template-unknown", "spec.dataset", "{id: org/d, chatTemplate: vicuna}"),
        ("chat-template-jinja", "spec.dataset", '{id: org/d, chatTemplate: "{{ messages }}"}'),
        ("sources-and-format", "spec.dataset", "{sources: [{id: org/a}], format: chat}"),
        ("sources-default-format", "spec.dataset", "{sources: [{id: org/a}], format: text}"),
        (
            "sources-9",
            "spec.dataset",
            "{sources: [" + ", ".join(f"{{id: org/a{i}}}" for i in range(9)) + "]}",
        ),
        ("source-files-mixed", "spec.dataset", "{sources: [{files: [a.jsonl, b.csv]}]}"),
        ("source-weight-zero", "spec.dataset", "{sources: [{id: org/a, weight: 0}]}"),
        ("wandb-online-no-key", "spec.training", "{reportTo: [wandb]}"),
        ("wandb-offline", "spec.training", "{reportTo: [wandb], trackers: {wandb: {mode: offline}}}"),
        ("mlflow-uri-password", "spec.training", "{trackers: {mlflow: {trackingUri: 'https://a:b@m.x'}}}"),
        ("tracker-secret-inline", "spec.training", "{trackers: {mlflow: {token: abc}}}"),
        ("source-id-with-id", "spec.model", "{id: org/m, sourceId: org/m}"),
        ("attn-unknown", "spec.model", "{id: org/m, attnImplementation: flash}"),
        # Sizes.
        ("configmap-over-1mib", "spec.samples.prompts", "[" + ", ".join(['"' + "€" * 6000 + '"'] * 32) + "]"),
    ]
    return [Case(*row) for row in c]


CASES = _cases()

# Where `kubetune validate` is stricter than the API server, on purpose: the operator would fail the run
# anyway, and only the models can see it.
DIFFERENCES = {
    "token-in-base64": "CEL cannot decode base64; validate and the operator refuse the token it hides",
    "token-in-metadata": "CEL sees only metadata.name of metadata; validate and the operator refuse it",
    "configmap-over-1mib": "the run's ConfigMap (the spec with every default, as YAML) is over 1 MiB; CEL "
    "cannot render it, the API server would refuse the ConfigMap when the operator creates it",
}


def document(case: Case) -> str:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    *parents, last = case.path.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = SENTINEL
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1 << 30)
    assert text.count(SENTINEL) == 1
    return text.replace(SENTINEL, case.text)


def test_cases_are_distinct_and_many() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 40
    assert set(DIFFERENCES) <= {c.id for c in CASES}


def test_validate_accepts_exactly_what_the_api_server_accepts(
    control_plane: ControlPlane, crd: None, namespace: str, tmp_path: Path
) -> None:
    rows = []
    for case in CASES:
        text = document(case)
        proc = control_plane.kubectl(
            "create", "--dry-run=server", f"--namespace={namespace}", "-f", "-", input=text
        )
        server = proc.returncode == 0
        file = tmp_path / f"{case.id}.yaml"
        file.write_text(text, encoding="utf-8")
        result = validate_paths([file])
        ours = not result.problems and len(result.jobs) == 1
        said = "; ".join(str(p).split(": ", 1)[-1] for p in result.problems)[:200]
        rows.append((case.id, server, ours, (proc.stderr or proc.stdout).strip()[:200], said))
        assert TOKEN not in said
    differ = {r[0] for r in rows if r[1] != r[2]}
    table = "\n".join(
        f"{'  ' if r[1] == r[2] else '≠ '}{r[0]:30} server={'accepts' if r[1] else 'refuses'} "
        f"validate={'accepts' if r[2] else 'refuses'}\n      server: {r[3]}\n      validate: {r[4]}"
        for r in rows
    )
    assert differ == set(DIFFERENCES), f"\n{table}"
    # Every listed difference is validate being stricter, never laxer.
    assert all(server and not ours for case_id, server, ours, *_ in rows if case_id in DIFFERENCES)
