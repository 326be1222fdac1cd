"""The model card, its lineage and the loss curve: cards for a local-path and a Hub-id base model (the Hub
is the LOCAL STAND-IN of tests/hubstandin.py), the merged model's card, and the PNG."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.trainer

huggingface_hub = pytest.importorskip("huggingface_hub")
pytest.importorskip("matplotlib")

from hubstandin import FAKE_TOKEN, StandInHub  # noqa: E402
from kubetune.api.v1alpha1 import FineTuneJob  # noqa: E402
from kubetune.redact import add_secret  # noqa: E402
from kubetune.render import spec_hash  # noqa: E402
from kubetune.trainer import lineage, modeling, plot  # noqa: E402
from kubetune.trainer.card import render_card  # noqa: E402
from kubetune.trainer.errors import TrainerError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "jobs" / "tiny" / "llama"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UID = "6f1d3c2a-0b7e-4d59-9a43-1c2e3f4a5b6c"
SOURCE_COMMIT = "3f2c1b0a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
DATA_DIGEST = "ab" * 32


@pytest.fixture(autouse=True)
def _fresh_lineage(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test resolves for itself, with a token in the environment that must never reach a card."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    lineage.forget()
    yield
    lineage.forget()


def make_job(model: dict[str, Any], *, dataset: dict[str, Any] | None = None, **spec: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {
                "name": "llama-guanaco",
                "namespace": "research",
                "uid": UID,
                "annotations": {
                    "kubetune.io/source-commit": SOURCE_COMMIT,
                    # A repository URL with credentials in it must not reach the card.
                    "kubetune.io/source-repo": "https://ci-bot:glpat-s3cr3t@github.com/acme/finetunes.git",
                },
            },
            "spec": {
                "model": model,
                "dataset": dataset or {"files": ["data.jsonl"], "format": "alpaca"},
                **spec,
            },
        }
    )


def log_history(steps: int = 120, eval_every: int = 20) -> list[dict[str, Any]]:
    """What a Trainer logs: a falling, noisy train loss every step, an eval loss every ``eval_every``
    steps, and the closing summary (``train_loss``, not a point of the curve)."""
    import math
    import random

    rng = random.Random(0)
    out: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        loss = 1.1 + 1.6 * math.exp(-step / 25) + rng.uniform(-0.12, 0.12)
        out.append(
            {
                "loss": round(loss, 4),
                "grad_norm": 0.8,
                "learning_rate": 2e-4,
                "epoch": step / 60,
                "step": step,
            }
        )
        if step % eval_every == 0:
            out.append({"eval_loss": 1.25 + 1.4 * math.exp(-step / 30), "eval_runtime": 1.0, "step": step})
    out.append({"train_loss": 1.4, "train_runtime": 80.0, "step": steps})
    return out


def metrics_with_sources() -> dict[str, Any]:
    return {
        "method": "qlora",
        "run": "llama-guanaco-0123abcd",
        "steps": 120,
        "train_loss_last": 1.12,
        "eval_loss": 1.31,
        "data": {
            "rows_read": 1200,
            "kept": 1150,
            "sources": [
                {
                    "name": "timdettmers/openassistant-guanaco",
                    "format": "chat",
                    "train_on": "assistant",
                    "rows_read": 1000,
                    "empty_dropped": 10,
                    "duplicates_dropped": 30,
                    "kept": 960,
                    "train_rows": 900,
                    "validation_rows": 60,
                    "weight": 0.5,
                    "max_rows": None,
                },
                {
                    "name": "data.jsonl",
                    "format": "alpaca",
                    "train_on": "completion",
                    "rows_read": 200,
                    "empty_dropped": 0,
                    "duplicates_dropped": 10,
                    "kept": 190,
                    "train_rows": 180,
                    "validation_rows": 10,
                    "weight": None,
                    "max_rows": 150,
                },
            ],
        },
    }


def parse(card: str) -> Any:
    """The card as the Hub's client reads it; the front matter must be a mapping it understands."""
    parsed = huggingface_hub.ModelCard(card)
    assert isinstance(parsed.data.to_dict(), dict) and parsed.text.lstrip().startswith("#")
    return parsed


def assert_no_secret(card: str) -> None:
    assert FAKE_TOKEN not in card
    assert "glpat-s3cr3t" not in card and "ci-bot" not in card


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# A local folder
# --------------------------------------------------------------------------------------------------


def test_local_folder_card_has_base_model_licence_digests_run_and_loss_curve(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "llama"
    shutil.copytree(TINY, folder)
    # A copy of the Hub's Llama-2-7b-chat-hf carries its card: the licence comes from it, but not its
    # base_model, which names chat's own parent; model.sourceId says what the folder is.
    (folder / "README.md").write_text(
        "---\nlicense: llama2\nbase_model: meta-llama/Llama-2-7b-hf\ntags: [llama]\n---\n# Llama 2\n"
    )
    job = make_job({"path": "models/llama", "sourceId": "meta-llama/Llama-2-7b-chat-hf"})
    found = lineage.resolve_model(job.spec, tmp_path)

    assert found.path == "models/llama" and found.id is None and found.commit is None
    assert found.base_model == "meta-llama/Llama-2-7b-chat-hf" and found.base_model_from == "model.sourceId"
    assert found.license == "llama2"
    # The weights and the config, hashed; not the tokenizer or the README.
    assert found.files_sha256 == {
        "config.json": sha256(folder / "config.json"),
        "model.safetensors": sha256(folder / "model.safetensors"),
    }
    assert lineage.pinned_revision(job.spec) is None  # a folder has no revision to pin

    run = lineage.run_info(job, "llama-guanaco-0123abcd")
    assert run == {
        "run": "llama-guanaco-0123abcd",
        "spec_hash": spec_hash(job),
        "name": "llama-guanaco",
        "namespace": "research",
        "uid": UID,
        "source_commit": SOURCE_COMMIT,
        "source_repo": "https://github.com/acme/finetunes.git",
    }
    record = {
        "base_model": found.as_dict(),
        "datasets": [{"files": {"data.jsonl": DATA_DIGEST}}],
        "run": run,
    }
    json.dumps(record)  # metrics.json holds it
    card = render_card(
        job.spec,
        name="llama-guanaco",
        metrics=metrics_with_sources(),
        samples=[],
        lineage=record,
        kind="adapter",
        loss_curve="loss.png",
        versions={"torch": "9.9"},
    )
    data = parse(card).data
    assert data.base_model == "meta-llama/Llama-2-7b-chat-hf"
    assert data.base_model_relation == "adapter" and data.library_name == "peft"
    assert data.license == "llama2"
    assert "datasets" not in data.to_dict()  # local files are no Hub dataset
    assert "![Train and eval loss against step](loss.png)" in card
    lineage_text = card.split("## Lineage")[1].split("\n## ")[0]
    assert "local folder `models/llama`; base model [`meta-llama/Llama-2-7b-chat-hf`]" in lineage_text
    assert "(from model.sourceId)" in lineage_text and "from the folder's README.md" in lineage_text
    for name, digest in found.files_sha256.items():
        assert f"| `{name}` | `{digest}` |" in lineage_text
    assert f"`data.jsonl` (sha256 `{DATA_DIGEST}`)" in lineage_text
    assert f"spec hash `{spec_hash(job)}`" in lineage_text and "`llama-guanaco-0123abcd`" in lineage_text
    assert f"`research/llama-guanaco`, UID `{UID}`" in lineage_text
    assert f"https://github.com/acme/finetunes/commit/{SOURCE_COMMIT}" in lineage_text
    # Counts per source, from metrics["data"]["sources"].
    assert (
        "| timdettmers/openassistant-guanaco | chat | assistant | 1000 | 10 | 30 | 960 | 900 | 60 | 0.5 | - |"
        in (lineage_text)
    )
    assert "| data.jsonl | alpaca | completion | 200 | 0 | 10 | 190 | 180 | 10 | 1 | 150 |" in lineage_text
    assert_no_secret(card)


def test_a_folder_without_a_card_has_an_unknown_licence_and_no_guessed_base_model(tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    shutil.copytree(TINY, folder)
    config = json.loads((folder / "config.json").read_text())
    # Where config.json names the Hub id it was saved from (transformers 4 wrote it), that is the base.
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "acme/llama-7b-base"}))
    found = lineage.resolve_model(make_job({"path": str(folder)}).spec, tmp_path)
    assert (found.base_model, found.base_model_from, found.license) == (
        "acme/llama-7b-base",
        "config.json",
        None,
    )

    # A local path there is no base model on the Hub: none is guessed.
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "/tmp/checkpoints/llama"}))
    job = make_job({"path": str(folder)})
    found = lineage.resolve_model(job.spec, tmp_path)
    assert found.base_model is None and found.files_sha256["config.json"] == sha256(folder / "config.json")
    card = render_card(
        job.spec, name="x", metrics={}, samples=[], lineage={"base_model": found.as_dict()}, kind="model"
    )
    data = parse(card).data
    assert data.base_model is None and data.license == "unknown" and data.library_name == "transformers"
    assert "Licence:** unknown" in card


def test_a_hub_cache_snapshot_folder_is_its_repository_at_its_commit(tmp_path: Path) -> None:
    commit = "c" * 40
    snapshot = tmp_path / "hub" / "models--acme--llama-7b" / "snapshots" / commit
    shutil.copytree(TINY, snapshot)
    found = lineage.resolve_model(make_job({"path": str(snapshot)}).spec, tmp_path)
    assert (found.base_model, found.commit, found.resolved_from) == ("acme/llama-7b", commit, "path")
    assert found.base_model_from == "cache path" and "model.safetensors" in found.files_sha256


# --------------------------------------------------------------------------------------------------
# A Hub id, against the local stand-in
# --------------------------------------------------------------------------------------------------


def test_hub_id_is_resolved_to_its_commit_loaded_at_it_and_carded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with StandInHub() as hub:
        hub.point(monkeypatch, tmp_path / "cache")
        commit = hub.serve_model(
            "acme/tiny-llama",
            TINY,
            card_data={
                "license": "other",
                "license_name": "acme-community",
                "license_link": "https://acme.example/licence",
            },
        )
        job = make_job(
            {"id": "acme/tiny-llama"},
            dataset={"id": "timdettmers/openassistant-guanaco", "format": "chat"},
            output={"hub": {"repoId": "me/tiny-guanaco", "token": {"secretKeyRef": {"name": "hf"}}}},
        )
        found = lineage.resolve_model(job.spec, tmp_path)
        assert (found.id, found.revision, found.commit, found.resolved_from) == (
            "acme/tiny-llama",
            "main",
            commit,
            "hub",
        )
        assert (found.license, found.license_name, found.license_link) == (
            "other",
            "acme-community",
            "https://acme.example/licence",
        )
        assert lineage.pinned_revision(job.spec) == commit
        # Every load of the run names the commit, not "main" (which may move meanwhile).
        tokenizer = modeling.load_tokenizer(job.spec, tmp_path)
        assert tokenizer.eos_token == "</s>"
        assert hub.downloads and {revision for _, _, revision, _ in hub.downloads} == {commit}
        # Resolved once per process: the loads did not ask again.
        assert hub.infos == [("acme/tiny-llama", "main")]
        assert set(hub.auth_headers) == {f"Bearer {FAKE_TOKEN}"}  # gated models need the token

    record = {
        "base_model": found.as_dict(),
        "datasets": [
            {
                "id": "timdettmers/openassistant-guanaco",
                "revision": "main",
                "split": "train",
                "commit": "d" * 40,
            }
        ],
        "run": lineage.run_info(job, "llama-guanaco-0123abcd"),
    }
    card = render_card(
        job.spec,
        name="tiny-guanaco",
        metrics={},
        samples=[],
        lineage=record,
        kind="adapter",
        loss_curve="loss.png",
    )
    data = parse(card).data
    assert data.base_model == "acme/tiny-llama" and data.base_model_relation == "adapter"
    assert (data.license, data.license_name, data.license_link) == (
        "other",
        "acme-community",
        "https://acme.example/licence",
    )
    assert data.datasets == ["timdettmers/openassistant-guanaco"]
    assert (
        f"(https://huggingface.co/acme/tiny-llama/tree/{commit}) at revision `main` = commit `{commit}`"
        in card
    )
    assert f"/datasets/timdettmers/openassistant-guanaco/tree/{'d' * 40}" in card
    assert "![Train and eval loss against step](loss.png)" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-guanaco")' in card
    assert_no_secret(card)


def test_a_revision_or_repository_the_hub_does_not_have_fails_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with StandInHub() as hub:
        hub.point(monkeypatch, tmp_path / "cache")
        hub.serve_model("acme/tiny-llama", TINY)
        with pytest.raises(TrainerError, match=r"model\.revision: 'v9' is not a revision of acme/tiny-llama"):
            lineage.resolve_model(make_job({"id": "acme/tiny-llama", "revision": "v9"}).spec, tmp_path)
        with pytest.raises(TrainerError, match=r"model\.id: the Hub has no model 'acme/gone'") as e:
            modeling.load_tokenizer(make_job({"id": "acme/gone"}).spec, tmp_path)
        assert FAKE_TOKEN not in str(e.value)
        assert hub.downloads == []  # nothing was loaded


class LfsHub:
    """The Hub's model_info as it answers for a real repository: weights in LFS with their sha256."""

    def __init__(self, commit: str, digests: dict[str, str]) -> None:
        self.paths: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub.paths.append(self.path)
                siblings: list[dict[str, Any]] = [{"rfilename": "config.json"}, {"rfilename": "README.md"}]
                siblings += [
                    {"rfilename": name, "lfs": {"size": 10, "sha256": digest, "pointerSize": 134}}
                    for name, digest in digests.items()
                ]
                body = json.dumps({"id": "acme/big", "sha": commit, "siblings": siblings}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LfsHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_hub_weights_digests_are_the_hubs_lfs_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digests = {
        "model-00001-of-00002.safetensors": "1" * 64,
        "model-00002-of-00002.safetensors": "2" * 64,
        "original/consolidated.00.pth": "3" * 64,  # not what from_pretrained loads
    }
    with LfsHub("e" * 40, digests) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        found = lineage.resolve_model(make_job({"id": "acme/big", "revision": "v1.0"}).spec, tmp_path)
    assert hub.paths[0].startswith("/api/models/acme/big/revision/v1.0")
    assert found.commit == "e" * 40 and found.license is None
    assert found.files_sha256 == {k: v for k, v in digests.items() if "/" not in k}
    card = render_card(
        make_job({"id": "acme/big"}).spec,
        name="x",
        metrics={},
        samples=[],
        lineage={"base_model": found.as_dict()},
    )
    assert f"| `model-00002-of-00002.safetensors` | `{'2' * 64}` |" in card
    assert parse(card).data.license == "unknown"


def test_an_unreachable_hub_falls_back_to_the_cache_then_to_the_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens there: the Hub cannot be asked (an offline cluster).
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    job = make_job({"id": "acme/tiny-llama", "revision": "main"})
    with caplog.at_level(logging.WARNING, logger="kubetune.trainer"):
        found = lineage.resolve_model(job.spec, tmp_path)
    assert found.commit is None and found.resolved_from is None
    assert lineage.pinned_revision(job.spec) == "main"  # loads the revision as given
    assert "could not resolve acme/tiny-llama revision 'main' to a commit" in caplog.text
    assert FAKE_TOKEN not in caplog.text
    card = render_card(job.spec, name="x", metrics={}, samples=[], lineage={"base_model": found.as_dict()})
    assert "its commit could not be resolved" in card and parse(card).data.base_model == "acme/tiny-llama"

    # A cache filled beforehand (`hf download` into a shared volume) names the commit "main" was.
    commit = "f" * 40
    repo = cache / "models--acme--tiny-llama"
    shutil.copytree(TINY, repo / "snapshots" / commit)
    (repo / "snapshots" / commit / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    lineage.forget()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kubetune.trainer"):
        found = lineage.resolve_model(job.spec, tmp_path)
    assert (found.commit, found.resolved_from, found.license) == (commit, "cache", "apache-2.0")
    assert lineage.pinned_revision(job.spec) == commit
    assert f"using the local Hub cache's commit {commit}" in caplog.text


# --------------------------------------------------------------------------------------------------
# The merged model's card
# --------------------------------------------------------------------------------------------------


def test_merged_card(tmp_path: Path) -> None:
    job = make_job(
        {"id": "acme/tiny-llama"},
        output={
            "merged": True,
            "hub": {
                "repoId": "me/tiny-guanaco",
                "revision": "run-1",
                "token": {"secretKeyRef": {"name": "hf"}},
            },
        },
    )
    base = lineage.ModelLineage(
        id="acme/tiny-llama",
        revision="main",
        commit="a" * 40,
        resolved_from="hub",
        base_model="acme/tiny-llama",
        base_model_from="model.id",
        license="apache-2.0",
    )
    record = {"base_model": base.as_dict(), "datasets": [{"files": {"data.jsonl": DATA_DIGEST}}], "run": {}}
    merged = render_card(
        job.spec,
        name="tiny-guanaco",
        metrics={},
        samples=[],
        lineage=record,
        kind="merged",
        loss_curve="loss.png",
    )
    adapter = render_card(
        job.spec, name="tiny-guanaco", metrics={}, samples=[], lineage=record, kind="adapter"
    )
    m, a = parse(merged).data, parse(adapter).data
    # Merged weights are a fine-tune of the base (a full model, loaded with transformers), not an adapter.
    assert (m.base_model, m.base_model_relation, m.library_name) == (
        "acme/tiny-llama",
        "finetune",
        "transformers",
    )
    assert (a.base_model_relation, a.library_name) == ("adapter", "peft")
    assert m.license == a.license == "apache-2.0"
    assert "merged" in m.tags and "merged" not in a.tags
    assert merged.splitlines()[merged.splitlines().index("---", 1) + 2] == "# tiny-guanaco (merged)"
    assert "merged into the base model's (unquantized) weights" in merged
    assert 'from_pretrained("me/tiny-guanaco", subfolder="merged", revision="run-1")' in merged
    assert "![Train and eval loss against step](loss.png)" in merged
    assert "## Lineage" in merged and f"commit `{'a' * 40}`" in merged


def test_a_secret_in_an_annotation_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    add_secret("tracker-secret-value-1234")
    job = make_job({"id": "acme/tiny-llama"})
    job.metadata.annotations["kubetune.io/source-commit"] = "tracker-secret-value-1234 `oops`\n# heading"
    run = lineage.run_info(job, "r")
    card = render_card(job.spec, name="x", metrics={}, samples=[], lineage={"base_model": {}, "run": run})
    assert "tracker-secret-value-1234" not in card
    assert "\n# heading" not in card  # an annotation stays on its line, as inline code
    # Given no base model lineage, the card names what the spec does.
    assert parse(card).data.base_model == "acme/tiny-llama" and "at `main`" in card


# --------------------------------------------------------------------------------------------------
# The loss curve
# --------------------------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_loss_curve_png(tmp_path: Path) -> None:
    history = log_history()
    path = plot.render_loss_curve(history, tmp_path / "run" / "loss.png")
    assert path == tmp_path / "run" / "loss.png"
    data = path.read_bytes()
    assert png_size(data) == (720, 400) and len(data) > 10_000
    assert b"Matplotlib" not in data  # no version chunk: the same log draws the same file
    assert plot.render_loss_curve(history, tmp_path / "again.png") is not None
    assert (tmp_path / "again.png").read_bytes() == data
    # A few points (no smoothing), eval only, and a log with no loss at all.
    assert plot.render_loss_curve(history[:5], tmp_path / "short.png") is not None
    assert plot.render_loss_curve([{"eval_loss": 2.0, "step": 10}], tmp_path / "eval.png") is not None
    nothing = [{"train_loss": 1.0, "step": 3}, {"loss": float("nan"), "step": 1}]
    assert plot.render_loss_curve(nothing, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    assert plot.render_loss_curve(nothing, tmp_path / "short.png") is None  # no stale curve is left
    assert not (tmp_path / "short.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "eval.png", "run"]


def test_loss_curve_renders_with_a_read_only_home(tmp_path: Path) -> None:
    """In a pod HOME is read-only and there is no display: it renders, and matplotlib does not warn."""
    # A HOME nothing can be created under, whoever runs the test (root ignores a read-only mode).
    home = tmp_path / "home"
    home.write_text("not a folder")
    out = tmp_path / "loss.png"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "DISPLAY", "MPLBACKEND")
    }
    env["HOME"] = str(home)
    code = (
        "import json, sys; from pathlib import Path; from kubetune.trainer import plot; "
        f"print(plot.render_loss_curve(json.loads(sys.stdin.read()), Path({str(out)!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code],
        input=json.dumps(log_history(30)),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Matplotlib created a temporary cache directory" not in done.stderr
    assert done.stdout.strip() == str(out) and out.read_bytes()[:8] == PNG_MAGIC
