"""The model card (``README.md`` with Hub YAML front matter) written next to the adapter, the full model
and the merged model: what it is, exactly what it was trained from (the lineage), how the run went (the
loss curve and metrics), the spec and the software."""

from __future__ import annotations

import json
import os
import re
from importlib import metadata
from typing import Any, Literal

import yaml

import kubetune
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.contract import ENV_GIT_COMMIT, is_commit
from kubetune.redact import contains_token, redact

PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")
CardKind = Literal["adapter", "model", "merged"]
HUB = "https://huggingface.co"
# The Hub's relation of a model to its base_model: a LoRA adapter is an "adapter"; full fine-tuning and
# an adapter merged into the base weights are a "finetune" ("merge" is for merges of several models).
RELATION: dict[str, str] = {"adapter": "adapter", "model": "finetune", "merged": "finetune"}
# Metric keys the card shows in sections of their own (and in the raw JSON).
_OWN_SECTIONS = ("lineage", "prepared")
_LOSS_ON = {"completion": "the completions", "assistant": "the assistant turns", "all": "every token"}


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


def _code(value: Any, limit: int = 200) -> str:
    """``value`` as inline code, whatever it holds (annotations are free text): one line, no backtick."""
    text = " ".join(str(value).split()).replace("`", "'")
    return f"`{text[:limit]}{'…' if len(text) > limit else ''}`"


def _cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _hub_link(repo_id: str, commit: str | None, *, datasets: bool = False) -> str:
    base = f"{HUB}/{'datasets/' if datasets else ''}{repo_id}"
    return f"{base}/tree/{commit}" if commit else base


def _source_link(repo: str | None, commit: str | None) -> str | None:
    """A link to the commit on the forges whose commit URL is known (``<repo>/commit/<sha>``)."""
    if not repo or not commit or not is_commit(commit):
        return None
    m = re.match(r"^https://(github\.com|gitlab\.com|codeberg\.org)/([\w.\-/]+?)(\.git)?/?$", repo)
    return f"https://{m.group(1)}/{m.group(2)}/commit/{commit}" if m else None


def _default_lineage(spec: FineTuneJobSpec, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the card knows without a resolved lineage: metrics' (when it has the lineage's shape), else
    the spec's names."""
    given = metrics.get("lineage")
    if isinstance(given, dict) and isinstance(given.get("base_model"), dict):
        return given
    m = spec.model
    return {
        "base_model": {
            "id": m.id,
            "revision": m.revision if m.id else None,
            "path": m.path,
            "base_model": m.id,
        },
        "datasets": [
            {"id": p.id, "revision": p.revision, "split": p.split, "commit": None}
            if p.id is not None
            else {"files": dict.fromkeys(p.files or [], None)}
            for p in spec.dataset.parts()
        ],
        "run": {},
    }


def _front_matter(spec: FineTuneJobSpec, kind: CardKind, base: dict[str, Any], datasets: list[Any]) -> str:
    method = spec.method.type
    front: dict[str, Any] = {}
    if base.get("base_model"):
        front["base_model"] = base["base_model"]
        front["base_model_relation"] = RELATION[kind]
    front["library_name"] = "peft" if kind == "adapter" else "transformers"
    tags = ["kubetune", "trl", "sft", method]
    if spec.method.uses_adapter:
        tags.append("lora")
    if kind == "merged":
        tags.append("merged")
    front["tags"] = tags
    ids = [d["id"] for d in datasets if isinstance(d, dict) and d.get("id")]
    if ids:
        front["datasets"] = list(dict.fromkeys(ids))
    front["license"] = base.get("license") or "unknown"
    if front["license"] == "other":
        # The Hub asks a custom licence for its name and link.
        for key in ("license_name", "license_link"):
            if base.get(key):
                front[key] = base[key]
    front["pipeline_tag"] = "text-generation"
    return yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip()


def _base_line(base: dict[str, Any]) -> str:
    if base.get("id"):
        link = _hub_link(base["id"], base.get("commit"))
        line = f"[`{base['id']}`]({link}) at revision `{base.get('revision')}`"
        if base.get("commit"):
            line += f" = commit `{base['commit']}`"
            if base.get("resolved_from") == "cache":
                line += " (from the local Hub cache: the Hub could not be asked)"
        else:
            line += " (its commit could not be resolved: the revision may have moved since)"
        return line
    line = f"local folder `{base.get('path')}`"
    if base.get("base_model"):
        link = _hub_link(base["base_model"], base.get("commit"))
        line += f"; base model [`{base['base_model']}`]({link})"
        if base.get("commit"):
            line += f" at commit `{base['commit']}`"
        line += f" (from {base.get('base_model_from') or 'its metadata'})"
    return line


def _part_name(repo_id: str | None, files: list[str] | None) -> str:
    if repo_id:
        return f"`{repo_id}`"
    files = files or []
    more = f" and {len(files) - 1} more file(s)" if len(files) > 1 else ""
    return f"`{files[0] if files else '?'}`{more}"


def _base_short(base: dict[str, Any]) -> str:
    """The base model in a few words, for the summary (the Lineage section has the rest)."""
    if base.get("id"):
        at = f" at commit `{base['commit'][:12]}`" if base.get("commit") else f" at `{base.get('revision')}`"
        return f"[`{base['id']}`]({_hub_link(base['id'], base.get('commit'))}){at}"
    if base.get("base_model"):
        link = _hub_link(base["base_model"], None)
        return f"[`{base['base_model']}`]({link}), from the local folder `{base.get('path')}`"
    return f"the local folder `{base.get('path')}`"


def _dataset_line(entry: dict[str, Any]) -> str:
    if entry.get("id"):
        line = (
            f"[`{entry['id']}`]({_hub_link(entry['id'], entry.get('commit'), datasets=True)}), split "
            f"`{entry.get('split')}`, revision `{entry.get('revision')}`"
        )
        return line + (f" = commit `{entry['commit']}`" if entry.get("commit") else " (commit not resolved)")
    files = entry.get("files") or {}
    return "local files " + ", ".join(
        f"`{name}`" + (f" (sha256 `{digest}`)" if digest else "") for name, digest in files.items()
    )


def _sources_table(sources: list[dict[str, Any]]) -> list[str]:
    columns = (
        ("source", "name"),
        ("format", "format"),
        ("trainOn", "train_on"),
        ("read", "rows_read"),
        ("empty dropped", "empty_dropped"),
        ("duplicates dropped", "duplicates_dropped"),
        ("kept", "kept"),
        ("train", "train_rows"),
        ("validation", "validation_rows"),
        ("weight", "weight"),
        ("maxRows", "max_rows"),
    )
    lines = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + " --- |" * len(columns)]
    for s in sources:
        row = {**s, "weight": 1 if s.get("weight") is None else s["weight"]}  # unset weight: 1
        lines.append("| " + " | ".join(_cell(row.get(k)) for _, k in columns) + " |")
    return lines


def _lineage_section(lineage: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    base = lineage.get("base_model") or {}
    datasets = lineage.get("datasets") or []
    run = lineage.get("run") or {}
    lines = ["## Lineage", "", "What exactly this model was trained from, and by which run.", ""]
    lines.append(f"- **Base model:** {_base_line(base)}")
    licence = base.get("license")
    if licence:
        named = f" ({base['license_name']})" if base.get("license_name") else ""
        link = f", see {base['license_link']}" if base.get("license_link") else ""
        card = "the base model's card" if base.get("id") else "the folder's README.md"
        lines.append(f"- **Licence:** `{licence}`{named}{link}, from {card}")
    else:
        lines.append("- **Licence:** unknown (no model card names one): check the base model's terms")
    for i, entry in enumerate(datasets, start=1):
        label = "Dataset" if len(datasets) == 1 else f"Dataset {i}"
        lines.append(f"- **{label}:** {_dataset_line(entry)}")
    if run:
        lines.append(f"- **Run:** {_code(run.get('run'))}, spec hash `{run.get('spec_hash')}`")
        where = "/".join(str(v) for v in (run.get("namespace"), run.get("name")) if v)
        if where:
            uid = f", UID `{run['uid']}`" if run.get("uid") else ""
            lines.append(f"- **FineTuneJob:** {_code(where)}{uid}")
        commit, repo = run.get("source_commit"), run.get("source_repo")
        if commit or repo:
            text = " ".join(
                part
                for part in (_code(repo) if repo else "", f"commit {_code(commit)}" if commit else "")
                if part
            )
            view = _source_link(repo, commit)
            lines.append(f"- **GitOps source:** {text}" + (f" ([view]({view}))" if view else ""))
    digests = base.get("files_sha256") or {}
    if digests:
        lines += ["", "Base model files (sha256):", "", "| file | sha256 |", "| --- | --- |"]
        lines += [f"| `{name}` | `{digest}` |" for name, digest in sorted(digests.items())]
    data = metrics.get("data")
    sources = data.get("sources") if isinstance(data, dict) else None
    if isinstance(sources, list) and sources:
        lines += ["", "Rows per dataset source (cleaned and deduplicated across the mix):", ""]
        lines += _sources_table(sources)
    return [*lines, ""]


def _use_section(spec: FineTuneJobSpec, kind: CardKind) -> list[str]:
    hub = spec.output.hub
    if hub is None or (kind == "adapter" and not spec.output.push_adapter):
        return []
    args = [json.dumps(hub.repo_id)]
    if kind == "merged":
        args.append('subfolder="merged"')
    if hub.revision != "main":
        args.append(f"revision={json.dumps(hub.revision)}")
    if kind == "adapter":
        code = [
            "from peft import AutoPeftModelForCausalLM",
            "",
            f"model = AutoPeftModelForCausalLM.from_pretrained({', '.join(args)})",
        ]
    else:
        code = [
            "from transformers import AutoModelForCausalLM",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({', '.join(args)})",
        ]
    return ["## Use", "", "```python", *code, "```", ""]


def render_card(
    spec: FineTuneJobSpec,
    *,
    name: str,
    metrics: dict[str, Any],
    samples: list[dict[str, str]],
    lineage: dict[str, Any] | None = None,
    kind: CardKind | None = None,
    loss_curve: str | None = None,
    versions: dict[str, str] | None = None,
    git_commit: str | None = None,
) -> str:
    """The card's text.

    ``lineage`` is ``{"base_model": ModelLineage.as_dict(), "datasets": [...], "run": run_info}``
    (default: ``metrics["lineage"]``, else what the spec names). ``kind``: ``adapter`` (a LoRA adapter),
    ``model`` (full fine-tuning) or ``merged`` (an adapter merged into the base weights); default from the
    method. ``loss_curve``: the PNG's path relative to the card (it is copied beside each card).
    ``git_commit`` defaults to ``$KUBETUNE_GIT_COMMIT``."""
    versions = versions if versions is not None else package_versions()
    git_commit = git_commit if git_commit is not None else os.environ.get(ENV_GIT_COMMIT) or None
    kind = kind or ("adapter" if spec.method.uses_adapter else "model")
    if lineage is None:
        lineage = _default_lineage(spec, metrics)
    else:  # the parts not given: what the spec names
        lineage = {**_default_lineage(spec, {}), **{k: v for k, v in lineage.items() if v}}
    base = lineage.get("base_model") or {}
    datasets = lineage.get("datasets") or []
    method = spec.method.type
    quant = spec.method.effective_quantization()
    method_line = {
        "qlora": "QLoRA (LoRA adapter on a 4-bit base)",
        "lora": "LoRA" + (" on an 8-bit base" if quant is not None else ""),
        "full": "full fine-tuning",
    }[method]
    what = {
        "adapter": "A LoRA adapter",
        "model": "A fully fine-tuned model",
        "merged": "The LoRA adapter merged into the base model's (unquantized) weights",
    }[kind]
    formats = "; ".join(
        f"{_part_name(p.id, p.files)} ({p.format}, loss on {_LOSS_ON[p.effective_train_on()]})"
        for p in spec.dataset.parts()
    )
    lines = [
        "---",
        _front_matter(spec, kind, base, datasets),
        "---",
        "",
        f"# {name}" + (" (merged)" if kind == "merged" else ""),
        "",
        f"{what}, fine-tuned with [kubetune](https://github.com/kubetune/kubetune) and TRL's SFTTrainer: "
        f"{method_line}.",
        "",
        f"- **Base model:** {_base_short(base)}",
        f"- **Data:** {formats}",
        f"- **Method:** {method_line}",
        "",
    ]
    if loss_curve:
        lines += ["## Loss", "", f"![Train and eval loss against step]({loss_curve})", ""]
    lines += _lineage_section(lineage, metrics)
    lines += _use_section(spec, kind)
    lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        if key in _OWN_SECTIONS or isinstance(value, list):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items() if not isinstance(v, (dict, list)))
        lines.append(f"| {_cell(key)} | {_cell(value)} |")
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
    lines += ["", "## Raw metrics", "", "```json", json.dumps(metrics, indent=2, default=str), "```", ""]
    # Redacted where it is made (a sample completion, a metric's text, an annotation), then checked once more.
    text = redact("\n".join(lines))
    check_no_secrets(text)
    return text
