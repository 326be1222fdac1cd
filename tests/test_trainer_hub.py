"""Pushing to the Hub, tested against a LOCAL STAND-IN for the Hugging Face Hub (tests/hubstandin.py).

``StandInHub`` is not the Hub: it is a small HTTP server on 127.0.0.1 that implements just the calls kubetune
makes, so the real ``huggingface_hub`` client can talk to it through ``HF_ENDPOINT``. Nothing leaves the
machine (the real Hub cannot be reached from the test machines, and must not be). Like a careless server or
proxy, its error bodies repeat the request's Authorization header, and the bare token in it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("trl")
huggingface_hub = pytest.importorskip("huggingface_hub")

import tiny  # noqa: E402
from hubstandin import FAKE_TOKEN, StandInHub  # noqa: E402
from kubetune.trainer import run  # noqa: E402
from kubetune.trainer.errors import SecretMissing, TrainerError  # noqa: E402

__all__ = ["FAKE_TOKEN", "StandInHub"]  # where the stand-in lived before tests/hubstandin.py


def test_push_to_a_local_stand_in_for_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trains a tiny QLoRA adapter, merges it, and pushes to the LOCAL STAND-IN Hub (not the real one)."""
    model = tiny.save_tiny_model(tmp_path / "model", "llama")
    job = tiny.write_job(
        tmp_path / "job",
        model,
        training={"maxSteps": 4, "saveSteps": 4, "loggingSteps": 1},
        output={
            "path": "out",
            "hub": {
                "repoId": "me/tiny-qlora",
                "revision": "run-1",
                "token": {"secretKeyRef": {"name": "hf-token"}},
            },
            "pushMerged": True,
        },
    )
    out = tiny.run_folder(job)
    with StandInHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("KUBETUNE_RUN", raising=False)
        # A local run: no $HF_TOKEN and no `hf auth login` token. It fails before loading anything.
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
        with pytest.raises(
            SecretMissing, match=r"output\.hub\.token: the HF_TOKEN environment variable is not set"
        ) as failed:
            run(job)
        assert "Secret 'hf-token', key 'token'" in str(failed.value)
        assert failed.value.exit_code == 4 and failed.value.reason == "SecretMissing"
        assert hub.commits == []
        assert json.loads((out / "progress.json").read_text())["state"] == "Failed"
        assert not (out / "checkpoints").exists()
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        # The Hub refuses the first push (a token without write access): a person must fix it (exit 6),
        # and the trained run is kept.
        hub.fail_next = [403]
        with pytest.raises(TrainerError, match=r"the Hub refused the push to me/tiny-qlora .*HTTP 403") as e:
            run(job)
        assert e.value.exit_code == 6 and FAKE_TOKEN not in str(e.value)
        assert hub.commits == [] and (out / "training-complete.json").is_file()
        trained = sorted(p.name for p in (out / "checkpoints").iterdir())
        # Fixed, started again: no training this time, the same adapter, and the push lands.
        capsys.readouterr()
        metrics = run(job)
        assert "training already complete at step 4" in capsys.readouterr().out
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == trained

    assert hub.unknown == []
    assert hub.repos == {"me/tiny-qlora": {"private": True}}
    assert [m["library_name"] for m in hub.validated] == ["peft", "peft"]  # the card's metadata, twice
    assert set(hub.branches) == {("me/tiny-qlora", "run-1")}
    assert hub.auth_headers and all(a == f"Bearer {FAKE_TOKEN}" for a in hub.auth_headers)
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == "me/tiny-qlora" and commit["revision"] == "run-1"
    assert commit["header"]["summary"] == f"kubetune: t (qlora, run {out.name})"
    files = commit["files"]
    expected = [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
        "metrics.json",
        "samples.json",
        "merged/model.safetensors",
        "merged/config.json",
        "merged/tokenizer.json",
        "merged/README.md",
    ]
    assert [name for name in expected if name not in files] == []
    assert not any(name.startswith(("checkpoints/", "progress")) for name in files)
    assert "training_args.bin" not in files
    assert files["README.md"] == (out / "README.md").read_bytes()
    assert files["adapter_model.safetensors"] == (out / "adapter/adapter_model.safetensors").read_bytes()
    assert FAKE_TOKEN.encode() not in b"".join(files.values())
    assert metrics["hub_commit_url"].startswith(f"{hub.url}/me/tiny-qlora/commit/")
    assert json.loads((out / "progress.json").read_text())["state"] == "Succeeded"

    # The merged model is the base with the adapter folded in: same architecture, no LoRA weights, and
    # the same outputs as base + adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)
        with tuned.disable_adapter():
            assert not torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)


def test_push_retries_transient_failures_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the LOCAL STAND-IN Hub: a 503 is retried and the push lands; a 403 fails at once, as an
    error a person must fix (exit code 6); 503s until the last attempt stay unexpected (exit 1, retried)."""
    from huggingface_hub.errors import HfHubHTTPError

    from kubetune.api.v1alpha1 import HubOutput
    from kubetune.trainer import hub as hub_mod

    monkeypatch.setattr(hub_mod, "RETRY_WAIT_SECONDS", 0.0)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    (tmp_path / "adapter_config.json").write_text("{}")
    files = [("adapter_config.json", tmp_path / "adapter_config.json")]
    target = HubOutput.model_validate({"repoId": "me/retry", "token": {"secretKeyRef": {"name": "t"}}})
    with StandInHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.fail_next = [503, 502]
        url = hub_mod.push(target, files, commit_message="m")
        assert len(hub.commits) == 1 and url.startswith(f"{hub.url}/me/retry/commit/")
        assert hub.fail_next == []

        hub.fail_next = [403, 503]
        with pytest.raises(TrainerError, match="HTTP 403") as refused:
            hub_mod.push(target, files, commit_message="m")
        assert isinstance(refused.value.__cause__, HfHubHTTPError)
        assert hub.fail_next == [503]  # no second attempt after a 403
        assert len(hub.commits) == 1

        hub.fail_next = [503] * (hub_mod.ATTEMPTS + 1)
        with pytest.raises(HfHubHTTPError):
            hub_mod.push(target, files, commit_message="m")
        assert len(hub.commits) == 1


ODD_TOKEN = "kt-odd-" + "Zq81-not-hf-shaped.Wv3"  # a token of another shape: only add_secret masks it


def test_a_hub_that_echoes_the_token_leaks_it_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Against the LOCAL STAND-IN Hub, whose error bodies repeat the Authorization header and the token:
    the trainer's entrypoint (as the Pod runs it) prints, logs, writes and reports it nowhere. Once as
    $HF_TOKEN (a 401: a person must fix it), once as a `hf auth login` token of another shape (503s until
    the retries run out: an unexpected error, with a traceback and retry warnings)."""
    from kubetune.trainer import hub as hub_mod
    from kubetune.trainer.__main__ import main

    monkeypatch.setattr(hub_mod, "RETRY_WAIT_SECONDS", 0.0)
    model = tiny.save_tiny_model(tmp_path / "model", "llama")
    job = tiny.write_job(
        tmp_path / "job",
        model,
        training={"maxSteps": 2, "saveSteps": 2, "loggingSteps": 1},
        output={"path": "out", "hub": {"repoId": "me/echo", "token": {"secretKeyRef": {"name": "hf-token"}}}},
    )
    out = tiny.run_folder(job)
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(termination))
    monkeypatch.delenv("KUBETUNE_RUN", raising=False)
    seen: dict[str, str] = {}
    with StandInHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)

        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        hub.fail_next = [401]
        assert main(["--spec", str(job)]) == 6
        seen["401 output"] = "".join(capfd.readouterr())
        seen["401 termination message"] = termination.read_text()
        termination.unlink()

        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: ODD_TOKEN)
        hub.fail_next = [503] * hub_mod.ATTEMPTS
        assert main(["--spec", str(job)]) == 1
        seen["503 output"] = "".join(capfd.readouterr())
        seen["503 termination message"] = termination.read_text()

    # Both tokens were sent, and came back in the bodies; the messages carry the bodies, masked.
    assert f"Bearer {FAKE_TOKEN}" in hub.auth_headers and f"Bearer {ODD_TOKEN}" in hub.auth_headers
    assert "HTTP 401" in seen["401 termination message"]
    assert "Authorization: Bearer ***; the token *** has no write access" in seen["401 termination message"]
    assert "Traceback (most recent call last)" in seen["503 output"]
    assert "Retrying" in seen["503 output"] and "stand-in failure 503" in seen["503 output"]
    assert "HfHubHTTPError" in seen["503 termination message"]
    # Every file the run wrote: the card, metrics, samples, progress, checkpoints, the adapter.
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        seen[str(path.relative_to(out))] = path.read_bytes().decode("latin-1")
    assert "README.md" in seen and "progress.json" in seen
    for token in (FAKE_TOKEN, ODD_TOKEN):
        leaks = [where for where, text in seen.items() if token in text or token.split("-")[-1] in text]
        assert leaks == [], f"{token} in {leaks}"
    assert hub.commits == []


def test_a_hub_model_is_trained_at_its_resolved_commit_and_pushed_with_its_lineage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.id through the LOCAL STAND-IN Hub, which SERVES the tiny model: the trainer resolves
    model.revision ("main") to its commit before loading, loads tokenizer, model and the merge at that
    commit, and pushes adapter, merged model, both cards and the loss curve, no pickle among them. The card
    carries base_model, the licence from the base's card data, the commit and the curve; the final
    progress line gives the operator's status both the commit and the push's commit URL."""
    from huggingface_hub import ModelCard

    from kubetune.trainer import hub as hub_mod
    from kubetune_operator.status import progress_fields

    base = tiny.save_tiny_model(tmp_path / "base", "llama")
    job = tiny.write_job(
        tmp_path / "job",
        base,
        training={"maxSteps": 4, "saveSteps": 4, "loggingSteps": 1},
        output={
            "path": "out",
            "merged": True,
            "hub": {"repoId": "me/tiny-out", "token": {"secretKeyRef": {"name": "hf-token"}}},
        },
    )
    doc = yaml.safe_load(job.read_text())
    doc["spec"]["model"] = {"id": "org/tiny-base"}  # revision: main
    job.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tiny.run_folder(job)
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(termination))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("KUBETUNE_RUN", raising=False)
    with StandInHub() as hub:
        commit = hub.serve_model("org/tiny-base", base, card_data={"license": "apache-2.0"})
        hub.point(monkeypatch, tmp_path / "hub-cache")
        metrics = run(job)

    assert hub.unknown == []
    # Resolved by branch first, before any file was asked for; then every file of the base was loaded at
    # that commit. (peft, saving the adapter, looks at config.json on the default branch to tell whether
    # the vocabulary was resized: the only file request that names no commit. transformers asks for the
    # repo's info, on the default branch, for its tags.)
    assert hub.reads[0] == "info org/tiny-base@main"
    assert set(hub.infos) == {("org/tiny-base", "main")}
    assert {rev for _, _, rev, name in hub.downloads if name != "config.json"} == {commit}
    assert {rev for method, _, rev, _ in hub.downloads if method == "GET"} == {commit}
    fetched = {name for method, _, _, name in hub.downloads if method == "GET"}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= fetched
    assert hub.auth_headers and all(a == f"Bearer {FAKE_TOKEN}" for a in hub.auth_headers)

    assert metrics["lineage"]["base_model"]["commit"] == commit
    assert json.loads((out / "adapter/adapter_config.json").read_text())["revision"] == commit
    digest = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert metrics["lineage"]["base_model"]["files_sha256"] == {"model.safetensors": digest}
    assert len(hub.commits) == 1
    files = hub.commits[0]["files"]
    expected = [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "README.md",
        "loss.png",
        "metrics.json",
        "samples.json",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
        "merged/README.md",
        "merged/loss.png",
    ]
    assert [name for name in expected if name not in files] == []
    # No pickle went up: none by name, none by content (a pickle's PROTO opcode, torch.save's zip).
    assert [n for n in files if n.endswith(hub_mod.PICKLE_SUFFIXES)] == []
    assert [n for n, data in files.items() if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04"] == []
    assert FAKE_TOKEN.encode() not in b"".join(files.values())

    assert (
        files["loss.png"].startswith(b"\x89PNG\r\n\x1a\n") and files["loss.png"] == files["merged/loss.png"]
    )
    assert files["README.md"] == (out / "README.md").read_bytes()
    for name in ("README.md", "merged/README.md"):
        text = files[name].decode()
        card = ModelCard(text)
        assert card.data.base_model == "org/tiny-base", name
        assert card.data.license == "apache-2.0", name
        assert commit in text and digest[:16] in text and "(loss.png)" in text, name
    assert hub.validated and hub.validated[-1]["license"] == "apache-2.0"

    url = metrics["hub_commit_url"]
    assert url.startswith(f"{hub.url}/me/tiny-out/commit/")
    progress = json.loads((out / "progress.json").read_text())
    assert (progress["state"], progress["base_model_commit"], progress["hub_commit_url"]) == (
        "Succeeded",
        commit,
        url,
    )
    # What the operator makes of the line the trainer leaves as its termination message.
    status = progress_fields(termination.read_text())
    assert (status["phase"], status["baseModelCommit"], status["hubCommitUrl"]) == ("Succeeded", commit, url)
