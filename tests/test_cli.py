"""The `kubetune` command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubetune.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_validate_examples_ok() -> None:
    result = CliRunner().invoke(main, ["validate", str(ROOT / "jobs")])
    assert result.exit_code == 0, result.output
    assert "FineTuneJob(s) valid" in result.output


def test_validate_reports_file_line_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: kubetune.io/v1alpha1\n"
        "kind: FineTuneJob\n"
        "metadata: {name: bad}\n"
        "spec:\n"
        "  model: {id: tiiuae/falcon-7b}\n"
        "  dataset: {id: timdettmers/openassistant-guanaco}\n"
        "  training:\n"
        "    epochs: 3\n"
        "    maxSteps: 10\n"
        "    lerningRate: 0.1\n"
    )
    other = tmp_path / "other.yaml"
    other.write_text(bad.read_text().replace("    lerningRate: 0.1\n", ""))
    result = CliRunner().invoke(main, ["validate", str(bad), str(other), str(ROOT / "jobs")])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{bad}:10: spec.training.lerningRate: unknown field 'lerningRate'; did you mean 'learningRate'?",
        f"{other}:7: spec.training: set training.epochs or training.maxSteps, not both",
    ]
    assert "2 error(s)" in result.stderr


def test_validate_fails_when_no_job_found(tmp_path: Path) -> None:
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert result.exit_code == 1


def test_validate_names_missing_paths_and_empty_folders(tmp_path: Path) -> None:
    """A wrong path is a problem in the usual format (not click's usage error), with the fix."""
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml"), str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{tmp_path / 'nope.yaml'}:0: <file>: no such file or folder: check the path",
        f"{tmp_path / 'empty'}:0: <file>: no .yaml or .yml file in this folder: pass the files, "
        "or the folder that holds them",
    ]
    assert result.stderr == "2 error(s) in 0 file(s)\n"


def test_validate_reads_standard_input() -> None:
    text = (ROOT / "jobs/bloom-lora.yaml").read_text()
    result = CliRunner().invoke(main, ["validate", "-"], input=text)
    assert result.exit_code == 0 and result.stdout == "ok: 1 FineTuneJob(s) valid in 1 file(s)\n"
    result = CliRunner().invoke(main, ["validate", "-"], input=text.replace("type: lora", "type: lora2"))
    assert result.exit_code == 1 and result.stdout.startswith("<stdin>:17: spec.method.type: ")


def test_validate_never_echoes_a_token(tmp_path: Path) -> None:
    """The token scan runs before the apiVersion check (which shows what it got) and unknown fields."""
    token = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    text = (ROOT / "jobs/bloom-lora.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("apiVersion: kubetune.io/v1alpha1", f"apiVersion: {token}"))
    key = tmp_path / "key.yaml"
    key.write_text(text.replace("    epochs: 1\n", f"    epochs: 1\n    {token}: 1\n"))
    result = CliRunner().invoke(main, ["validate", str(bad), str(key)])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{bad}:4: apiVersion: looks like a Hugging Face token: never put a token in a spec; store it in a "
        "Secret and reference it with spec.output.hub.token.secretKeyRef",
        f"{key}:26: spec.training.hf_***: looks like a Hugging Face token: never put a token in a spec; "
        "store it in a Secret and reference it with spec.output.hub.token.secretKeyRef",
    ]
    assert token not in result.output and token[3:] not in result.output


def test_validate_reads_values_as_kubectl_does(tmp_path: Path) -> None:
    """`2e-4` is a number for kubectl (go-yaml), not the string PyYAML makes of it."""
    text = (ROOT / "jobs/bloom-lora.yaml").read_text().replace("learningRate: 1.0e-4", "learningRate: 2e-4")
    job = tmp_path / "job.yaml"
    job.write_text(text)
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code == 0, result.output


def test_render_prints_the_objects() -> None:
    result = CliRunner().invoke(main, ["render", str(ROOT / "jobs/bloom-lora.yaml"), "-n", "team-x"])
    assert result.exit_code == 0, result.output
    objects = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objects] == ["PersistentVolumeClaim", "ConfigMap", "Job"]
    assert all(o["metadata"]["namespace"] == "team-x" for o in objects)


def test_render_of_invalid_file_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: b}\nspec: {}\n")
    result = CliRunner().invoke(main, ["render", str(bad)])
    assert result.exit_code == 1 and "spec.model: required field is missing" in result.stderr


def test_crd_and_schema_commands() -> None:
    crd = yaml.safe_load(CliRunner().invoke(main, ["crd"]).stdout)
    assert crd["kind"] == "CustomResourceDefinition"
    schema = CliRunner().invoke(main, ["schema"]).stdout
    assert '"FineTuneJobSpec"' in schema


def test_run_needs_local(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(ROOT / "jobs/bloom-lora.yaml")])
    assert result.exit_code == 2 and "--local" in result.output


def test_validate_never_imports_the_ml_stack() -> None:
    """`kubetune validate` in CI must not pay for torch (see bench/startup.py for the timing)."""
    code = (
        "import sys\n"
        "from kubetune.cli import main\n"
        f"main(['validate', '-q', {str(ROOT / 'jobs')!r}], standalone_mode=False)\n"
        "heavy = {'torch', 'transformers', 'trl', 'peft', 'datasets', 'bitsandbytes', 'accelerate'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.trainer
def test_run_local_trains_through_the_same_launcher_as_the_cluster(tmp_path: Path) -> None:
    """The README's example, as a user runs it: `kubetune run jobs/tiny-local.yaml --local`."""
    pytest.importorskip("torch")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("kubetune")),
            "run",
            str(ROOT / "jobs/tiny-local.yaml"),
            "--local",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 40/40" in proc.stdout
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("tiny-local-")
    folder = runs[0]
    assert f"kubetune: run folder: {folder}" in proc.stderr and f"kubetune: done: {folder}" in proc.stderr
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["train_loss_last"] < metrics["train_loss_first"]
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()


def test_validate_lists_the_fields_of_optional_nested_models(tmp_path: Path) -> None:
    """Issue 11: the hint under method.lora and method.quantization (optional models) was an empty
    "known fields:" list."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: kubetune.io/v1alpha1\n"
        "kind: FineTuneJob\n"
        "metadata: {name: bad}\n"
        "spec:\n"
        "  model: {id: tiiuae/falcon-7b}\n"
        "  dataset: {id: timdettmers/openassistant-guanaco}\n"
        "  method:\n"
        "    lora:\n"
        "      rank: 16\n"
        "      useDoRA: true\n"
        "    quantization:\n"
        "      kind: nf4\n"
    )
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{bad}:9: spec.method.lora.rank: unknown field 'rank'; known fields: r, alpha, dropout, "
        "targetModules, bias, modulesToSave, useDora, rsLora",
        f"{bad}:10: spec.method.lora.useDoRA: unknown field 'useDoRA'; did you mean 'useDora'?",
        f"{bad}:12: spec.method.quantization.kind: unknown field 'kind'; known fields: bits, quantType, "
        "doubleQuant, computeDtype",
    ]
