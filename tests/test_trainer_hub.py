"""Pushing to the Hub, tested against a LOCAL STAND-IN for the Hugging Face Hub.

``StandInHub`` is not the Hub: it is a small HTTP server on 127.0.0.1 that implements just the calls a
kubetune push makes (create repo, create branch, preupload, commit with inline base64 files), so the real
``huggingface_hub`` client can talk to it through ``HF_ENDPOINT``. Nothing leaves the machine (the real Hub
cannot be reached from the test machines, and must not be). Like a careless server or proxy, its error
bodies repeat the request's Authorization header, and the bare token in it.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("trl")
huggingface_hub = pytest.importorskip("huggingface_hub")

import tiny  # noqa: E402
from kubetune.trainer import run  # noqa: E402
from kubetune.trainer.errors import SecretMissing, TrainerError  # noqa: E402

FAKE_TOKEN = "hf_" + "FakeHubToken0123456789abcdef"


class StandInHub:
    """A local stand-in for the Hub API (see the module docstring). Records what it is asked."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self.unknown: list[str] = []
        self.validated: list[Any] = []
        self.fail_next: list[int] = []  # HTTP statuses to answer the next commits with
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _echo(self) -> str:
                """The request's credentials, repeated as an error body must never be trusted not to."""
                auth = str(self.headers.get("Authorization"))
                return f"Authorization: {auth}; the token {auth.split()[-1]} has no write access"

            def do_POST(self) -> None:
                hub.auth_headers.append(self.headers.get("Authorization"))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
                if parts == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    # Older clients send "private", newer ones "visibility".
                    private = req["private"] if "private" in req else req.get("visibility") == "private"
                    hub.repos[repo] = {"private": private}
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                if parts == ["api", "validate-yaml"]:
                    # The client checks README.md's metadata before a commit: the front matter must parse.
                    content = json.loads(body)["content"]
                    try:
                        front = (
                            yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else {}
                        )
                    except yaml.YAMLError as exc:
                        return self._reply(400, {"error": f"invalid YAML metadata: {exc}"})
                    hub.validated.append(front)
                    return self._reply(200, {"errors": [], "warnings": []})
                if len(parts) >= 5 and parts[:2] == ["api", "models"]:
                    repo, action, rest = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
                    if action == "branch":
                        hub.branches.append((repo, rest))
                        return self._reply(200, {})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        modes = [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                        ]
                        return self._reply(200, {"files": modes})
                    if action == "commit" and hub.fail_next:
                        status = hub.fail_next.pop(0)
                        return self._reply(status, {"error": f"stand-in failure {status}: {self._echo()}"})
                    if action == "commit":
                        received: dict[str, bytes] = {}
                        header: dict[str, Any] = {}
                        for line in body.splitlines():
                            item = json.loads(line)
                            if item["key"] == "header":
                                header = item["value"]
                            elif item["key"] == "file":
                                received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        hub.commits.append(
                            {"repo": repo, "revision": rest, "header": header, "files": received}
                        )
                        oid = f"{len(hub.commits):040x}"
                        return self._reply(
                            200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid}
                        )
                hub.unknown.append(f"POST {self.path}")
                return self._reply(
                    404, {"error": f"the stand-in Hub does not implement POST {self.path} ({self._echo()})"}
                )

            def do_GET(self) -> None:
                hub.unknown.append(f"GET {self.path}")
                self._reply(404, {"error": f"the stand-in Hub does not implement GET {self.path}"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


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
    ]
    assert [name for name in expected if name not in files] == []
    assert not any(name.startswith(("checkpoints/", "progress")) for name in files)
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
