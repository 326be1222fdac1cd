"""The model card (``README.md`` with Hub YAML front matter) written next to the adapter."""

from __future__ import annotations

import json
import os
from importlib import metadata
from typing import Any

import yaml

import kubetune
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.contract import ENV_GIT_COMMIT
from kubetune.redact import contains_token, redact

PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def spec_yaml(spec: FineTuneJobSpec) -> str:
    """The spec (never metadata or status) as YAML, with wire (camelCase) names and unset fields left out.

    A spec cannot hold a token (the API refuses anything that looks like one); ``output.hub.token`` is
    only a Secret name and key."""
    data = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def check_no_secrets(text: str, what: str = "model card") -> None:
    """Refuse to write or push anything that holds a Hugging Face token, the value of ``$HF_TOKEN`` or
    a secret the trainer registered, plainly or base64-encoded (kubetune.redact; kept under ``-O``)."""
    if contains_token(text):
        raise RuntimeError(
            f"refusing to write the {what}: it contains something that looks like a Hugging Face token "
            "or the value of HF_TOKEN"
        )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_card(
    spec: FineTuneJobSpec,
    *,
    name: str,
    metrics: dict[str, Any],
    samples: list[dict[str, str]],
    versions: dict[str, str] | None = None,
    git_commit: str | None = None,
) -> str:
    """The card's text. ``git_commit`` defaults to ``$KUBETUNE_GIT_COMMIT``."""
    versions = versions if versions is not None else package_versions()
    git_commit = git_commit if git_commit is not None else os.environ.get(ENV_GIT_COMMIT) or None
    method = spec.method.type
    adapter = spec.method.uses_adapter

    front: dict[str, Any] = {}
    if spec.model.id is not None:
        front["base_model"] = spec.model.id
    front["library_name"] = "peft" if adapter else "transformers"
    front["tags"] = ["kubetune", "trl", "sft", method] + (["lora"] if adapter else [])
    if spec.dataset.id is not None:
        front["datasets"] = [spec.dataset.id]
    front["license"] = "unknown"
    front["pipeline_tag"] = "text-generation"

    lineage = metrics.get("lineage") or {}

    def at_commit(key: str) -> str:
        return f" (commit `{lineage[key]}`)" if lineage.get(key) else ""

    if spec.model.id is not None:
        base = (
            f"[`{spec.model.id}`](https://huggingface.co/{spec.model.id}) at revision `{spec.model.revision}`"
            + at_commit("base_model_commit")
        )
    else:
        base = f"local folder `{spec.model.path}`"
    if spec.dataset.id is not None:
        data = (
            f"[`{spec.dataset.id}`](https://huggingface.co/datasets/{spec.dataset.id}) at revision "
            f"`{spec.dataset.revision}`{at_commit('dataset_commit')}, split `{spec.dataset.split}`"
        )
    else:
        digests = lineage.get("dataset_files_sha256") or {}
        data = "local files " + ", ".join(
            f"`{f}`" + (f" (sha256 `{digests[f][:16]}…`)" if f in digests else "")
            for f in spec.dataset.files or []
        )
    quant = spec.method.effective_quantization()
    method_line = {
        "qlora": "QLoRA (LoRA adapter on a 4-bit base)",
        "lora": "LoRA" + (" on an 8-bit base" if quant is not None else ""),
        "full": "full fine-tuning",
    }[method]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"Fine-tuned with [kubetune](https://github.com/kubetune/kubetune) ({method_line}, TRL SFTTrainer).",
        "",
        f"- **Base model:** {base}",
        f"- **Dataset:** {data} (format `{spec.dataset.format}`)",
        f"- **Method:** {method_line}",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key, value in metrics.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items() if not isinstance(v, dict))
        lines.append(f"| {key} | {_fmt(value)} |")
    lines += ["", "## Samples", ""]
    if samples:
        for s in samples:
            lines += [f"**Prompt:** {s['prompt']}", "", "```text", s["completion"], "```", ""]
    else:
        lines += ["No sample prompts were set (`spec.samples.prompts`).", ""]
    lines += [
        "## Training spec",
        "",
        "The FineTuneJob spec this model was trained from:",
        "",
        "```yaml",
        spec_yaml(spec).rstrip(),
        "```",
        "",
        "## Software",
        "",
        f"- kubetune {kubetune.__version__}" + (f" (git commit `{git_commit}`)" if git_commit else ""),
    ]
    lines += [f"- {k} {v}" for k, v in versions.items()]
    lines += ["", "## Raw metrics", "", "```json", json.dumps(metrics, indent=2), "```", ""]
    # Redacted where it is made (a sample completion, a metric's text), then checked once more.
    text = redact("\n".join(lines))
    check_no_secrets(text)
    return text
