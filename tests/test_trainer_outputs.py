"""What a run leaves in its folder: the adapter, the merged model with its own card (output.merged, no Hub
needed), the loss curve beside every card, lineage in metrics.json, the final progress line as the
termination message, and no pickle anywhere a person (or the Hub) gets it from.

Tiny random-weight models (tests/tiny.py) on the CPU, a few steps: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("trl")
huggingface_hub = pytest.importorskip("huggingface_hub")

import tiny  # noqa: E402
from kubetune.contract import parse_progress  # noqa: E402
from kubetune.trainer import run  # noqa: E402
from kubetune.trainer.errors import TrainerError  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pickles_are_refused_by_suffix_by_content_and_inside_a_zip(tmp_path: Path) -> None:
    from kubetune.trainer import hub

    root = tmp_path / "adapter"
    root.mkdir()
    (root / "adapter_config.json").write_text("{}")
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    torch.save({"w": torch.zeros(2)}, root / "adapter_model.safetensors")  # a pickle under a safe name
    assert hub.is_pickle(root / "adapter_model.safetensors")
    with pytest.raises(TrainerError, match=r"refusing to push adapter_model\.safetensors: pickle files"):
        hub.plan_upload(root_folder=root, extra_files=[], merged_folder=None)

    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, root / "adapter_model.safetensors")
    (root / "notes.dat").write_bytes(pickle.dumps({"x": 1}, protocol=4))  # a bare pickle
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps([1]))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "weights").write_bytes((tmp_path / "archive.zip").read_bytes())
    (merged / "training_args.bin").write_bytes(b"anything: refused by its name")
    with pytest.raises(TrainerError) as refused:
        hub.plan_upload(root_folder=root, extra_files=[], merged_folder=merged)
    assert "merged/training_args.bin, merged/weights, notes.dat" in str(refused.value)

    (root / "notes.dat").unlink()
    for f in list(merged.iterdir()):
        f.unlink()
    (merged / "model.safetensors").write_bytes((root / "adapter_model.safetensors").read_bytes())
    planned = hub.plan_upload(root_folder=root, extra_files=[], merged_folder=merged)
    assert [name for name, _ in planned] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "merged/model.safetensors",
    ]


def test_a_local_run_saves_the_merged_model_with_its_own_card_and_no_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """output.merged without output.hub: merged/ beside the adapter, each with a card that parses, names
    the base (from the local folder's own card) and embeds the loss curve next to it."""
    from huggingface_hub import ModelCard

    from kubetune.render import spec_hash
    from kubetune.trainer.spec import load_job

    base = tiny.save_tiny_model(tmp_path / "base", "llama")
    # A local copy of a Hub model keeps the Hub's card: the lineage takes the licence from it, and
    # model.sourceId names the repository the folder is a copy of (not the card's base_model, its parent).
    (base / "README.md").write_text("---\nbase_model: org/tiny-parent\nlicense: mit\n---\n# tiny\n")
    job = tiny.write_job(
        tmp_path / "job",
        base,
        training={"maxSteps": 4, "saveSteps": 4, "loggingSteps": 1},
        output={"path": "out", "merged": True},
    )
    spec = yaml.safe_load(job.read_text())
    spec["spec"]["model"]["sourceId"] = "org/tiny-origin"
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(termination))
    monkeypatch.delenv("KUBETUNE_RUN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    metrics = run(job)
    out = tiny.run_folder(job)

    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "loss.png"):
        assert (out / "merged" / name).is_file(), name
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "loss.png"):
        assert (out / "adapter" / name).is_file(), name
    # No pickle in what a person takes away (the checkpoints keep theirs, for resuming).
    from kubetune.trainer.hub import is_pickle

    handed_on = [p for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(out).parts]
    assert [p.name for p in handed_on if is_pickle(p)] == []
    assert (out / "checkpoints/checkpoint-4/training_args.bin").is_file()

    # One loss curve, a PNG, beside each card.
    curve = (out / "loss.png").read_bytes()
    assert curve.startswith(PNG_MAGIC) and len(curve) > 1000
    assert (out / "adapter/loss.png").read_bytes() == curve == (out / "merged/loss.png").read_bytes()

    digest = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    cards = {kind: (out / kind / "README.md").read_text() for kind in ("adapter", "merged")}
    assert (out / "README.md").read_text() == cards["adapter"]
    assert cards["merged"] != cards["adapter"]
    for kind, text in cards.items():
        card = ModelCard(text)
        assert card.data.base_model == "org/tiny-origin", kind
        assert card.data.license == "mit", kind
        assert "(loss.png)" in text, kind
        assert digest[:16] in text, kind
    assert ModelCard(cards["merged"]).data.library_name != "peft"

    lineage = metrics["lineage"]
    assert lineage["base_model"]["commit"] is None  # a folder has files, not commits
    assert lineage["run"]["run"] == out.name
    assert lineage["run"]["spec_hash"] == spec_hash(load_job(job))
    assert len(lineage["datasets"]) == 1
    assert json.loads((out / "metrics.json").read_text())["lineage"] == lineage

    # The final progress line is also the termination message (the operator may never read the log).
    final = parse_progress(termination.read_text())
    assert final is not None and final["state"] == "Succeeded" and final["step"] == 4
    assert "hub_commit_url" not in final and "base_model_commit" not in final

    # The merged model is the base with the adapter folded in.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(original, out / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)
