"""The base model is resolved once per run: every rank and every restart loads the commit the first
process of the run resolved, even after the branch moved (lineage.resolve_for_run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.trainer import lineage

OLD, NEW = "a" * 40, "b" * 40


def _spec(**model: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({"model": model, "dataset": {"id": "org/data"}})


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The branch's commit as the Hub answers it now (the test moves it), and who asked."""
    head = [OLD]
    asked: list[str] = []

    def from_hub(repo_id: str, revision: str) -> Any:
        asked.append(revision)
        return lineage._HubModel(head[0], "hub", {"license": "llama2"}, {"model.safetensors": "c" * 64})

    monkeypatch.setattr(lineage, "_from_hub", from_hub)
    lineage.forget()
    yield head
    lineage.forget()


def test_every_process_and_restart_of_a_run_pins_the_first_commit(hub: list[str], tmp_path: Path) -> None:
    spec = _spec(id="org/base", revision="main")
    run = tmp_path / "runs" / "r-1"
    first = lineage.resolve_for_run(spec, tmp_path, run)
    assert first.commit == OLD and lineage.pinned_revision(spec) == OLD
    assert json.loads((run / lineage.RUN_PIN).read_text())["commit"] == OLD

    hub[0] = NEW  # the branch moves while another rank starts, or before a restart
    lineage.forget()  # a new process
    again = lineage.resolve_for_run(spec, tmp_path, run)
    assert again.commit == OLD and again.license == "llama2" and lineage.pinned_revision(spec) == OLD

    # Another run (an edited spec) resolves afresh.
    lineage.forget()
    assert lineage.resolve_for_run(spec, tmp_path, tmp_path / "runs" / "r-2").commit == NEW


def test_a_pin_of_another_model_or_a_broken_file_is_not_used(hub: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    lineage.resolve_for_run(_spec(id="org/base", revision="main"), tmp_path, run)
    hub[0] = NEW
    lineage.forget()
    assert lineage.resolve_for_run(_spec(id="org/other", revision="main"), tmp_path, run).commit == NEW
    (run / lineage.RUN_PIN).write_text("{not json")
    lineage.forget()
    assert lineage.resolve_for_run(_spec(id="org/base", revision="main"), tmp_path, run).commit == NEW


def test_a_local_folder_is_hashed_once_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    spec = _spec(path=str(folder))
    run = tmp_path / "run"
    lineage.forget()
    digests = lineage.resolve_for_run(spec, tmp_path, run).files_sha256
    assert set(digests) == {"config.json", "model.safetensors"}
    lineage.forget()
    monkeypatch.setattr(lineage, "sha256_file", lambda path: pytest.fail(f"hashed {path} again"))
    assert lineage.resolve_for_run(spec, tmp_path, run).files_sha256 == digests


def test_dataset_commits_are_pinned_per_run_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.api.v1alpha1 import DatasetSource
    from kubetune.trainer import data

    head = [OLD]
    monkeypatch.setattr(data, "hub_commit", lambda part, where="dataset": head[0])
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n')
    dataset = DatasetSource.model_validate(
        {"sources": [{"id": "org/chat", "format": "chat"}, {"files": ["rows.jsonl"]}]}
    )
    pin = tmp_path / "run" / "datasets.json"
    first = data.resolve(dataset, tmp_path, pin)
    assert first[0]["commit"] == OLD and "rows.jsonl" in first[1]["files"]
    head[0] = NEW  # the branch moves before another rank (or a restart) starts
    assert data.resolve(dataset, tmp_path, pin)[0]["commit"] == OLD
    assert data.resolve(dataset, tmp_path, tmp_path / "other-run" / "datasets.json")[0]["commit"] == NEW
    assert data.resolve(dataset, tmp_path)[0]["commit"] == NEW  # no run: resolved afresh
