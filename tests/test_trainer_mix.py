"""Several datasets in one run (``dataset.sources``) and dataset lineage: counts per source, dedup across
the mix, seeded weight / maxRows, each source tokenized with its own format, and a Hub dataset's revision
resolved to its commit, then that exact commit loaded.

The Hub datasets come from :class:`DatasetHub`, a LOCAL STAND-IN for the Hub's dataset API on 127.0.0.1
(the real Hub cannot be reached from the test machines, and must not be): the real ``huggingface_hub``
and ``datasets`` clients load from it through ``HF_ENDPOINT``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

import tiny  # noqa: E402
from hubstandin import QuietHandler  # noqa: E402
from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec  # noqa: E402
from kubetune.trainer import data as data_mod  # noqa: E402
from kubetune.trainer import prepare as prep  # noqa: E402
from kubetune.trainer.errors import DataError  # noqa: E402

CHATS = [
    {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]}
    for w in ("hello", "river", "stone", "apple", "cloud", "green")
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny.build_tokenizer()


def mix_spec(
    sources: list[dict[str, Any]], training: dict[str, Any] | None = None, **dataset: Any
) -> FineTuneJobSpec:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "mix"},
            "spec": {
                "model": {"path": "m"},
                "dataset": {"sources": sources, **dataset},
                "training": {"maxSeqLength": 128, **(training or {})},
            },
        }
    ).spec


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# --------------------------------------------------------------------------------------------------
# A local stand-in for the Hub's dataset API
# --------------------------------------------------------------------------------------------------


class DatasetHub:
    """Serves dataset repositories, each commit a set of files, reachable by its commit or its branches:
    ``dataset_info`` (``/api/datasets/<repo>/revision/<rev>``), the tree listing and ``resolve`` HEAD/GET
    with the headers ``hf_hub_download`` needs. Records each request; a branch can move to another commit
    right after it was first resolved (someone pushed while the run started)."""

    def __init__(self) -> None:
        self.commits: dict[tuple[str, str], dict[str, bytes]] = {}
        self.refs: dict[tuple[str, str], str] = {}
        self.moves: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(QuietHandler):
            def _commit(self, repo: str, revision: str) -> str | None:
                commit = revision if (repo, revision) in hub.commits else hub.refs.get((repo, revision))
                if commit is None:
                    code = "RevisionNotFound" if any(r == repo for r, _ in hub.commits) else "RepoNotFound"
                    self._reply(404, {"error": f"{code}: {repo}@{revision}"}, {"X-Error-Code": code})
                return commit

            def _info(self, repo: str, revision: str) -> None:
                commit = self._commit(repo, revision)
                if commit is None:
                    return
                if (repo, revision) in hub.moves:  # the branch moves on, once resolved
                    hub.refs[(repo, revision)] = hub.moves.pop((repo, revision))
                files = hub.commits[(repo, commit)]
                when = "2026-11-01T00:00:00.000Z"
                info = {"_id": commit[:24], "id": repo, "sha": commit, "private": False, "gated": False}
                info |= {"disabled": False, "downloads": 0, "likes": 0, "tags": [], "cardData": {}}
                info |= {"siblings": [{"rfilename": f} for f in files], "lastModified": when}
                self._reply(200, info)

            def _tree(self, repo: str, revision: str, path: str, recursive: bool) -> None:
                commit = self._commit(repo, revision)
                if commit is None:
                    return
                prefix = f"{path.strip('/')}/" if path.strip("/") else ""
                entries: list[dict[str, Any]] = []
                folders: set[str] = set()
                for name, content in hub.commits[(repo, commit)].items():
                    if not name.startswith(prefix):
                        continue
                    rest = name[len(prefix) :].split("/")
                    if len(rest) > 1 and not recursive:
                        folders.add(prefix + rest[0])
                        continue
                    folders.update(prefix + "/".join(rest[:i]) for i in range(1, len(rest)))
                    oid = hashlib.sha1(content).hexdigest()
                    entries.append({"type": "file", "path": name, "size": len(content), "oid": oid})
                entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
                if prefix and not entries:
                    self._reply(404, {"error": "no such folder"}, {"X-Error-Code": "EntryNotFound"})
                    return
                self._reply(200, entries)

            def _resolve(self, repo: str, revision: str, path: str) -> None:
                commit = self._commit(repo, revision)
                if commit is None:
                    return
                content = hub.commits[(repo, commit)].get(path)
                if content is None:
                    headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
                    self._reply(404, {"error": f"Entry not found: {path}"}, headers)
                    return
                etag = f'"{hashlib.sha1(content).hexdigest()}"'
                self._reply(200, content, {"ETag": etag, "X-Repo-Commit": commit})

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                parts = [unquote(p) for p in url.path.strip("/").split("/")]
                hub.requests.append((self.command, url.path))
                if parts == ["api", "agent-harnesses"]:  # huggingface_hub's user-agent registry
                    return self._reply(200, {"standardEnvVars": [], "harnesses": {}})
                if len(parts) >= 6 and parts[:2] == ["api", "datasets"] and parts[4] == "revision":
                    return self._info("/".join(parts[2:4]), parts[5])
                if len(parts) >= 6 and parts[:2] == ["api", "datasets"] and parts[4] == "tree":
                    recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                    return self._tree("/".join(parts[2:4]), parts[5], "/".join(parts[6:]), recursive)
                if len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
                    return self._resolve("/".join(parts[1:3]), parts[4], "/".join(parts[5:]))
                self._reply(404, {"error": f"the stand-in does not implement {self.path}"})

            do_HEAD = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(self, repo: str, files: dict[str, bytes], branch: str | None = "main") -> str:
        """A commit of ``repo`` holding ``files`` (``branch`` then points to it); returns its sha."""
        digest = hashlib.sha1(repo.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        commit = digest.hexdigest()
        self.commits[(repo, commit)] = dict(files)
        if branch is not None:
            self.refs[(repo, branch)] = commit
        return commit

    def downloads(self, repo: str) -> list[str]:
        """The ``<revision>/<file>`` of each file of ``repo`` fetched (GET)."""
        prefix = f"/datasets/{repo}/resolve/"
        return [p[len(prefix) :] for m, p in self.requests if m == "GET" and p.startswith(prefix)]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[DatasetHub]:
    """The stand-in, with huggingface_hub and datasets pointed at it (each reads HF_ENDPOINT at import)
    and their caches in this test's folder."""
    import datasets.config
    import huggingface_hub.constants as constants

    stand_in = DatasetHub()
    stand_in._thread.start()
    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    monkeypatch.setattr(constants, "ENDPOINT", stand_in.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", stand_in.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", stand_in.url)
    monkeypatch.setattr(
        datasets.config, "HUB_DATASETS_URL", stand_in.url + "/datasets/{repo_id}/resolve/{revision}/{path}"
    )
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    yield stand_in
    stand_in._server.shutdown()
    stand_in._server.server_close()


# --------------------------------------------------------------------------------------------------
# Counts per source, dedup across the mix, weight and maxRows
# --------------------------------------------------------------------------------------------------


def test_counts_per_source_and_dedup_across_the_mix(tmp_path: Path, tokenizer: Any) -> None:
    alpaca = tiny.alpaca_rows(40, seed=1)
    empty = {"instruction": " ", "input": "", "output": ""}
    tiny.write_jsonl(tmp_path / "a.jsonl", [*alpaca[:30], alpaca[0], alpaca[1], empty])
    # b repeats 5 of a's rows (dropped: the first source wins) and brings 10 of its own.
    tiny.write_jsonl(tmp_path / "b.jsonl", [*alpaca[25:30], *alpaca[30:40]])
    tiny.write_jsonl(tmp_path / "c.jsonl", [{"body": f"note number {i}"} for i in range(8)] + [{"body": ""}])
    sources = [
        {"files": ["a.jsonl"], "format": "alpaca"},
        {"files": ["b.jsonl"], "format": "alpaca", "trainOn": "all"},
        {"files": ["c.jsonl"], "textField": "body"},
    ]
    data = data_mod.prepare(mix_spec(sources), tmp_path, tokenizer)
    by_name = {s["name"]: s for s in data.stats.sources}
    assert list(by_name) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    counts = ("rows_read", "empty_dropped", "duplicates_dropped", "kept", "train_rows", "validation_rows")
    assert [tuple(s[k] for k in counts) for s in data.stats.sources] == [
        (33, 1, 2, 30, 30, 0),
        (15, 0, 5, 10, 10, 0),
        (9, 1, 0, 8, 8, 0),
    ]
    assert [(s["format"], s["train_on"], s["weight"], s["max_rows"]) for s in data.stats.sources] == [
        ("alpaca", "completion", 1, None),
        ("alpaca", "all", 1, None),
        ("text", "all", 1, None),
    ]
    s = data.stats
    assert (s.rows_read, s.empty_dropped, s.duplicates_dropped, s.kept, s.train_rows) == (57, 2, 7, 48, 48)
    assert [len(p.train) for p in data.sources] == [30, 10, 8]
    assert set(data.sources[1].train["prompt"]).isdisjoint(data.sources[0].train["prompt"])
    assert data.lineage["datasets"] == [
        {"files": {"a.jsonl": hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()}},
        {"files": {"b.jsonl": hashlib.sha256((tmp_path / "b.jsonl").read_bytes()).hexdigest()}},
        {"files": {"c.jsonl": hashlib.sha256((tmp_path / "c.jsonl").read_bytes()).hexdigest()}},
    ]
    # dedup off: b keeps what a has too (a's own repeats are kept as well).
    loose = data_mod.prepare(mix_spec(sources, dedup=False), tmp_path, tokenizer)
    assert [x["duplicates_dropped"] for x in loose.stats.sources] == [0, 0, 0]
    assert [x["kept"] for x in loose.stats.sources] == [32, 15, 8]


def test_a_source_s_error_names_the_source(tmp_path: Path, tokenizer: Any) -> None:
    tiny.write_jsonl(tmp_path / "a.jsonl", tiny.alpaca_rows(5))
    tiny.write_jsonl(tmp_path / "c.jsonl", [{"body": "x"}])
    spec = mix_spec([{"files": ["a.jsonl"], "format": "alpaca"}, {"files": ["c.jsonl"]}])
    with pytest.raises(DataError) as err:
        data_mod.prepare(spec, tmp_path, tokenizer)
    assert str(err.value) == (
        "dataset.sources[1].textField: column 'text' not in dataset; columns are ['body'] (source c.jsonl)"
    )
    spec = mix_spec([{"files": ["a.jsonl"], "format": "alpaca"}, {"files": ["gone.jsonl"]}])
    with pytest.raises(DataError, match=r"^dataset\.sources\[1\]\.files: 'gone\.jsonl' not found"):
        data_mod.prepare(spec, tmp_path, tokenizer)
    # A source that cleaning empties (here: all of it repeats the first) is a mistake worth a stop.
    spec = mix_spec([{"files": ["a.jsonl"], "format": "alpaca"}, {"files": ["a.jsonl"], "format": "alpaca"}])
    with pytest.raises(DataError, match=r"^dataset\.sources\[1\]: no rows left after cleaning \(5 rows read"):
        data_mod.prepare(spec, tmp_path, tokenizer)


def test_mix_indices() -> None:
    import numpy as np

    def pick(n: int, weight: float | None, max_rows: int | None = None, seed: int = 0) -> list[int]:
        return data_mod.mix_indices(n, weight, max_rows, np.random.default_rng([seed, 0]))

    assert pick(10, None) == list(range(10))
    assert pick(10, 2) == sorted(list(range(10)) * 2)
    twice_and_a_half = Counter(pick(10, 2.5))
    assert sum(twice_and_a_half.values()) == 25 and set(twice_and_a_half.values()) == {2, 3}
    assert len(pick(10, 0.5)) == 5 and len(set(pick(10, 0.5))) == 5
    assert len(pick(10, 0.01)) == 1  # a weight never drops a source entirely
    assert len(pick(10, 3, max_rows=7)) == 7 and len(pick(10, None, max_rows=70)) == 10
    assert pick(100, 0.3, seed=1) == pick(100, 0.3, seed=1) != pick(100, 0.3, seed=2)


def test_weight_and_max_rows_are_seeded_and_validation_is_held_out_first(
    tmp_path: Path, tokenizer: Any
) -> None:
    tiny.write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha row {i}"} for i in range(40)])
    tiny.write_jsonl(tmp_path / "b.jsonl", [{"text": f"beta row {i}"} for i in range(10)])
    tiny.write_jsonl(tmp_path / "c.jsonl", [{"text": f"gamma row {i}"} for i in range(30)])

    def prepared(weight_a: float, seed: int = 42) -> Any:
        sources = [
            {"files": ["a.jsonl"], "weight": weight_a},
            {"files": ["b.jsonl"], "weight": 2.5},
            {"files": ["c.jsonl"], "maxRows": 7},
        ]
        spec = mix_spec(sources, {"seed": seed}, validation={"fraction": 0.1})
        return data_mod.prepare(spec, tmp_path, tokenizer)

    data = prepared(0.5)
    # Held out first (4 of 40, 1 of 10, 3 of 30), then weighted and capped.
    assert [(s["kept"], s["validation_rows"], s["train_rows"]) for s in data.stats.sources] == [
        (40, 4, 18),
        (10, 1, 23),
        (30, 3, 7),
    ]
    assert (data.stats.train_rows, data.stats.validation_rows) == (48, 8)
    b_rows = Counter(data.sources[1].train["text"])
    assert len(b_rows) == 9 and set(b_rows.values()) == {2, 3}  # every row twice, half of them thrice
    assert data.sources[2].train.num_rows == 7 and len(set(data.sources[2].train["text"])) == 7
    # Reproducible by seed; another seed, another sample.
    again = prepared(0.5)
    for one, two in zip(data.sources, again.sources, strict=True):
        assert one.train["text"] == two.train["text"]
        assert one.eval is not None and two.eval is not None and one.eval["text"] == two.eval["text"]
    other = prepared(0.5, seed=7)
    assert sorted(other.sources[0].train["text"]) != sorted(data.sources[0].train["text"])
    # The evaluation rows do not depend on the weights.
    heavier = prepared(3)
    assert heavier.stats.sources[0]["train_rows"] == 108
    assert heavier.eval is not None and data.eval is not None
    assert heavier.eval["text"] == data.eval["text"]


def test_fraction_leaving_no_validation_row(tmp_path: Path, tokenizer: Any) -> None:
    tiny.write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(30)])
    tiny.write_jsonl(tmp_path / "b.jsonl", [{"text": "b 1"}, {"text": "b 2"}])
    spec = mix_spec([{"files": ["a.jsonl"]}, {"files": ["b.jsonl"]}], validation={"fraction": 0.1})
    data = data_mod.prepare(spec, tmp_path, tokenizer)  # a small source gives no validation row
    assert [s["validation_rows"] for s in data.stats.sources] == [3, 0]
    spec = mix_spec([{"files": ["b.jsonl"]}, {"files": ["b.jsonl"]}], validation={"fraction": 0.1})
    with pytest.raises(DataError, match=r"no rows left after cleaning"):
        data_mod.prepare(spec, tmp_path, tokenizer)
    spec = mix_spec([{"files": ["b.jsonl"]}], validation={"fraction": 0.1})
    with pytest.raises(DataError, match=r"fraction 0\.1 of 2 rows leaves 0 validation rows"):
        data_mod.prepare(spec, tmp_path, tokenizer)


# --------------------------------------------------------------------------------------------------
# Prepared: each source tokenized with its own format, then mixed
# --------------------------------------------------------------------------------------------------


def test_prepared_mix_tokenizes_each_source_its_own_way(tmp_path: Path, tokenizer: Any) -> None:
    tiny.write_jsonl(tmp_path / "a.jsonl", tiny.alpaca_rows(20, seed=2))
    tiny.write_jsonl(tmp_path / "chat.jsonl", CHATS)
    tiny.write_jsonl(tmp_path / "t.jsonl", [{"text": f"plain text number {i}"} for i in range(10)])
    sources = [
        {"files": ["a.jsonl"], "format": "alpaca"},
        {"files": ["chat.jsonl"], "format": "chat"},
        {"files": ["t.jsonl"], "maxRows": 4},
    ]
    spec = mix_spec(sources)
    first = prep.load_or_prepare(spec, tmp_path, tokenizer, root=tmp_path / "cache")
    stats = json.loads((first.path / "stats.json").read_text())
    per_source = stats["data"]["sources"]
    assert [(s["name"], s["train_rows"]) for s in per_source] == [
        ("a.jsonl", 20),
        ("chat.jsonl", 6),
        ("t.jsonl", 4),
    ]
    assert (
        stats["lineage"] == first.lineage and [list(e) for e in first.lineage["datasets"]] == [["files"]] * 3
    )
    # The loss falls where each source's trainOn says: the response (alpaca), the assistant turns
    # (chat), everything (text).
    fractions = [s["train_loss_tokens"] / s["train_tokens"] for s in per_source]
    assert 0 < fractions[0] < 0.5 and 0 < fractions[1] < 0.8 and fractions[2] == 1.0
    assert first.tokens["train_tokens"] == sum(s["train_tokens"] for s in per_source)
    assert first.tokens["train_loss_tokens"] == sum(s["train_loss_tokens"] for s in per_source)
    assert first.tokens["train_loss_tokens"] == data_mod.loss_tokens(first.train)
    # Mixed: the sources are shuffled together (alpaca rows carry the prompt's -100s, text rows none),
    # the same way every time.
    masked = [labels[0] == -100 for labels in first.train["labels"]]
    assert len(masked) == 30 and masked != sorted(masked, reverse=True)
    other = prep.load_or_prepare(spec, tmp_path, tokenizer, root=tmp_path / "cache2")
    assert not other.cache_hit and other.key == first.key
    assert other.train["input_ids"] == first.train["input_ids"]
    # A source's weight is part of the key.
    heavier = mix_spec([{**sources[0], "weight": 2}, *sources[1:]])
    again = prep.load_or_prepare(heavier, tmp_path, tokenizer, root=tmp_path / "cache")
    assert again.key != first.key and len(again.train) == 50


# --------------------------------------------------------------------------------------------------
# Hub sources: the revision resolved to its commit before loading, and that commit loaded
# --------------------------------------------------------------------------------------------------


def test_hub_source_loads_the_commit_its_revision_resolved_to(
    hub: DatasetHub, tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = hub.add("org/chat", {"data/train.jsonl": jsonl(CHATS), "README.md": b"---\nlicense: mit\n---\n"})
    # main moves to a new commit right after kubetune resolved it: the run must still train on `old`.
    new = hub.add("org/chat", {"data/train.jsonl": jsonl(CHATS[:2])}, branch=None)
    hub.moves[("org/chat", "main")] = new
    calls: list[dict[str, Any]] = []
    real_load = datasets.load_dataset

    def spy(path: str, *args: Any, **kwargs: Any) -> Any:
        calls.append({"path": path, **kwargs})
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    tiny.write_jsonl(tmp_path / "a.jsonl", tiny.alpaca_rows(10))
    spec = mix_spec([{"id": "org/chat", "format": "chat"}, {"files": ["a.jsonl"], "format": "alpaca"}])
    prepared = prep.load_or_prepare(spec, tmp_path, tokenizer, root=tmp_path / "cache")

    digest = hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
    assert prepared.lineage == {
        "datasets": [
            {"id": "org/chat", "revision": "main", "split": "train", "commit": old},
            {"files": {"a.jsonl": digest}},
        ]
    }
    assert [c["revision"] for c in calls if c["path"] == "org/chat"] == [old]
    assert hub.refs[("org/chat", "main")] == new  # it did move
    fetched = hub.downloads("org/chat")
    assert f"{old}/data/train.jsonl" in fetched and {f.split("/")[0] for f in fetched} == {old}
    assert prepared.stats.sources[0]["rows_read"] == len(CHATS)  # old's rows, not new's two
    stats = json.loads((prepared.path / "stats.json").read_text())
    assert stats["inputs"]["data"][0]["commit"] == old
    # The same spec later: main is at `new` now, which is a new key and new rows.
    later = prep.load_or_prepare(spec, tmp_path, tokenizer, root=tmp_path / "cache")
    assert not later.cache_hit and later.key != prepared.key
    assert later.lineage["datasets"][0]["commit"] == new and later.stats.sources[0]["rows_read"] == 2


def test_hub_revision_pinned_by_tag_and_unknown_ones(hub: DatasetHub, tmp_path: Path, tokenizer: Any) -> None:
    commit = hub.add(
        "org/text", {"train.jsonl": jsonl([{"text": f"row {i}"} for i in range(5)])}, branch="v1"
    )
    spec = mix_spec([{"id": "org/text", "revision": "v1"}])
    data = data_mod.prepare(spec, tmp_path, tokenizer)
    assert data.lineage["datasets"] == [
        {"id": "org/text", "revision": "v1", "split": "train", "commit": commit}
    ]
    assert data.train["text"] == [f"row {i}" for i in range(5)]
    with pytest.raises(DataError) as err:
        data_mod.prepare(mix_spec([{"id": "org/text", "revision": "v9"}]), tmp_path, tokenizer)
    assert str(err.value) == "dataset.sources[0].revision: 'v9' is not a revision of org/text"
    with pytest.raises(DataError, match=r"^dataset\.sources\[0\]\.id: the Hub has no dataset 'org/none'"):
        data_mod.prepare(mix_spec([{"id": "org/none"}]), tmp_path, tokenizer)


def test_one_hub_dataset_and_its_validation_split_come_from_one_commit(
    hub: DatasetHub, tmp_path: Path, tokenizer: Any
) -> None:
    rows = tiny.alpaca_rows(30, seed=4)
    files = {
        "data/train-00000.jsonl": jsonl(rows[:24]),
        "data/test-00000.jsonl": jsonl([*rows[24:], rows[24]]),
    }
    commit = hub.add("org/qa", files)
    hub.moves[("org/qa", "main")] = hub.add(
        "org/qa", {"data/train-00000.jsonl": jsonl(rows[:3])}, branch=None
    )
    spec = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "one"},
            "spec": {
                "model": {"path": "m"},
                "dataset": {"id": "org/qa", "format": "alpaca", "validation": {"split": "test"}},
            },
        }
    ).spec
    data = data_mod.prepare(spec, tmp_path, tokenizer)
    assert data.lineage == {
        "datasets": [{"id": "org/qa", "revision": "main", "split": "train", "commit": commit}]
    }
    assert (data.stats.train_rows, data.stats.validation_rows) == (24, 6)
    assert data.stats.validation == {"rows_read": 7, "empty_dropped": 0, "duplicates_dropped": 1, "kept": 6}
    assert {f.split("/")[0] for f in hub.downloads("org/qa")} == {commit}
    assert len(data.stats.sources) == 1 and data.stats.sources[0]["name"] == "org/qa"


def test_unreachable_hub_warns_and_loads_the_revision_as_given(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    calls: list[dict[str, Any]] = []

    def offline_load(path: str, *args: Any, **kwargs: Any) -> Any:
        calls.append({"path": path, **kwargs})
        return datasets.Dataset.from_list([{"text": "from a local mirror"}, {"text": "second"}])

    monkeypatch.setattr(datasets, "load_dataset", offline_load)
    spec = mix_spec([{"id": "org/text", "revision": "v1"}])
    prepared = prep.load_or_prepare(spec, tmp_path, tokenizer, root=tmp_path / "cache")
    assert prepared.lineage["datasets"] == [
        {"id": "org/text", "revision": "v1", "split": "train", "commit": None}
    ]
    assert [(c["path"], c["revision"]) for c in calls] == [("org/text", "v1")]  # loaded once, as given
    assert "could not resolve org/text@v1 to a commit" in caplog.text
    stats = json.loads((prepared.path / "stats.json").read_text())
    assert "fingerprints" in stats["inputs"]["data"][0]  # the rows' fingerprint keys the cache


# --------------------------------------------------------------------------------------------------
# Through the trainer: a Hub chat dataset and local Alpaca files, on a tiny model
# --------------------------------------------------------------------------------------------------


@pytest.mark.trainer
def test_a_two_dataset_run_reports_counts_per_source(hub: DatasetHub, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("trl")
    from kubetune.trainer import run

    commit = hub.add("org/chat", {"data/train.jsonl": jsonl(CHATS * 2)})  # 6 repeats: dedup drops them
    model = tiny.save_tiny_model(tmp_path / "model", "llama")
    job_file = tiny.write_job(
        tmp_path,
        model,
        rows=tiny.alpaca_rows(40),
        training={"maxSteps": 4, "loggingSteps": 2, "saveSteps": 4, "perDeviceBatchSize": 4},
        samples={"prompts": ["Say hello."], "maxNewTokens": 4},
    )
    job = yaml.safe_load(job_file.read_text())
    job["spec"]["dataset"] = {
        "sources": [
            {"id": "org/chat", "format": "chat", "trainOn": "assistant", "weight": 2},
            {"files": ["data.jsonl"], "format": "alpaca", "maxRows": 30},
        ],
        "validation": {"fraction": 0.1},
    }
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))

    metrics = run(job_file)

    sources = metrics["data"]["sources"]
    counts = [(s["name"], s["rows_read"], s["duplicates_dropped"], s["kept"]) for s in sources]
    assert counts == [("org/chat", 12, 6, 6), ("data.jsonl", 40, 0, 40)]
    # chat: 1 of 6 held out, the other 5 twice; alpaca: 4 of 40 held out, 30 of the other 36.
    assert [(s["validation_rows"], s["train_rows"]) for s in sources] == [(1, 10), (4, 30)]
    assert [(s["train_on"], s["weight"], s["max_rows"]) for s in sources] == [
        ("assistant", 2, None),
        ("completion", 1, 30),
    ]
    assert (metrics["data"]["train_rows"], metrics["data"]["validation_rows"]) == (40, 5)
    assert 0 < metrics["prepared"]["train_loss_tokens"] < metrics["prepared"]["train_tokens"]
    folder = tiny.run_folder(job_file)
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["data"]["sources"] == sources
    digest = hashlib.sha256((tmp_path / "data.jsonl").read_bytes()).hexdigest()
    assert metrics["lineage"]["datasets"] == [
        {"id": "org/chat", "revision": "main", "split": "train", "commit": commit},
        {"files": {"data.jsonl": digest}},
    ]
    card = (folder / "README.md").read_text()
    assert commit in card and "org/chat" in card and "data.jsonl" in card
    assert any(f"{commit}/data/train.jsonl" == d for d in hub.downloads("org/chat"))
