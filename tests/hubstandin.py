"""A LOCAL STAND-IN for the Hugging Face Hub, for the trainer tests (not a test module).

``StandInHub`` is not the Hub: it is a small HTTP server on 127.0.0.1 that implements just the calls kubetune
makes, so the real ``huggingface_hub`` client (and transformers through it) can talk to it through
``HF_ENDPOINT``. Nothing leaves the machine (the real Hub cannot be reached from the test machines, and must
not be).

- Pushing: create repo, create branch, validate a card's YAML, preupload, commit with inline base64 files.
  Like a careless server or proxy, its error bodies repeat the request's Authorization header, and the bare
  token in it.
- Serving a model repository (:meth:`StandInHub.serve_model`): ``model_info`` at a branch or a commit (the
  commit sha, the card data with its licence, the files), ``resolve`` HEAD/GET of a file with the headers
  ``hf_hub_download`` needs (``X-Repo-Commit``, ``ETag``, ``Content-Length``; ``X-Error-Code`` on a 404),
  and the tree listing transformers asks for (``additional_chat_templates/``). Every request for a file
  is recorded with the revision it named, so a test can tell that a run loaded the commit it resolved.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

FAKE_TOKEN = "hf_" + "FakeHubToken0123456789abcdef"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")  # what a Hub repository's .gitattributes puts in LFS


@dataclass
class ServedRepo:
    """A model repository the stand-in serves: one commit of a local folder, reachable by its branches."""

    folder: Path
    commit: str
    card_data: dict[str, Any]
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit

    def sibling(self, name: str) -> dict[str, Any]:
        """A file as model_info (files_metadata) lists it: weights are LFS files, with their sha256."""
        data = (self.folder / name).read_bytes()
        entry: dict[str, Any] = {
            "rfilename": name,
            "size": len(data),
            "blobId": hashlib.sha1(data).hexdigest(),
        }
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def files(self) -> list[str]:
        return sorted(
            p.relative_to(self.folder).as_posix()
            for p in self.folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.folder).parts)
        )


def folder_commit(folder: Path) -> str:
    """A 40-hex "commit" of a folder's content (the stand-in's, not git's): same files, same commit."""
    digest = hashlib.sha1()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            digest.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()


class QuietHandler(BaseHTTPRequestHandler):
    """A stand-in's request handler: no access log, and replies as the Hub sends them (JSON, or the bytes
    of a file), with HEAD answered by the headers alone. Also the dataset stand-in's
    (tests/test_trainer_mix.py)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        if not isinstance(body, bytes):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


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
        self.served: dict[str, ServedRepo] = {}
        self.infos: list[tuple[str, str]] = []  # (repo, revision) of each model_info
        self.downloads: list[tuple[str, str, str, str]] = []  # (method, repo, revision, file) of each resolve
        self.telemetry: list[str] = []
        self.reads: list[str] = []  # infos and downloads, in the order they came
        hub = self

        class Handler(QuietHandler):
            def _echo(self) -> str:
                """The request's credentials, repeated as an error body must never be trusted not to."""
                auth = str(self.headers.get("Authorization"))
                return f"Authorization: {auth}; the token {auth.split()[-1]} has no write access"

            def _parts(self) -> list[str]:
                return [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]

            def do_POST(self) -> None:
                hub.auth_headers.append(self.headers.get("Authorization"))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = self._parts()
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

            # Serving -----------------------------------------------------------------------------------

            def _revision(self, repo: str, revision: str) -> ServedRepo | None:
                """The served repo, if `revision` (a branch or the commit) names its commit; else a 404
                with the error code huggingface_hub turns into the right exception (sent here)."""
                served = hub.served.get(repo)
                if served is None:
                    self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    return None
                if revision != served.commit and served.refs.get(revision) != served.commit:
                    self._reply(
                        404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
                    )
                    return None
                return served

            def _info(self, repo: str, revision: str) -> None:
                hub.infos.append((repo, revision))
                hub.reads.append(f"info {repo}@{revision}")
                served = self._revision(repo, revision)
                if served is None:
                    return
                when = "2026-11-01T00:00:00.000Z"
                self._reply(
                    200,
                    {
                        "_id": served.commit[:24],
                        "id": repo,
                        "modelId": repo,
                        "sha": served.commit,
                        "private": False,
                        "disabled": False,
                        "gated": False,
                        "downloads": 0,
                        "likes": 0,
                        "tags": ["transformers", "text-generation"],
                        "pipeline_tag": "text-generation",
                        "library_name": "transformers",
                        "cardData": served.card_data,
                        "siblings": [served.sibling(f) for f in served.files()],
                        "lastModified": when,
                        "createdAt": when,
                    },
                )

            def _resolve(self, repo: str, revision: str, path: str) -> None:
                hub.downloads.append((self.command, repo, revision, path))
                hub.reads.append(f"{self.command} {repo}@{revision}/{path}")
                served = self._revision(repo, revision)
                if served is None:
                    return
                local = served.folder / path
                commit = {"X-Repo-Commit": served.commit}
                if path not in served.files():
                    self._reply(
                        404,
                        {"error": f"Entry not found: {path}"},
                        {**commit, "X-Error-Code": "EntryNotFound"},
                    )
                    return
                data = local.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", served.commit)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            def _tree(self, repo: str, revision: str, path: str) -> None:
                served = self._revision(repo, revision)
                if served is None:
                    return
                prefix = f"{path.strip('/')}/" if path.strip("/") else ""
                entries = [
                    {"type": "file", "path": f, "size": (served.folder / f).stat().st_size, "oid": "0" * 40}
                    for f in served.files()
                    if f.startswith(prefix) and "/" not in f[len(prefix) :]
                ]
                if prefix and not entries:
                    self._reply(404, {"error": f"{path} does not exist"}, {"X-Error-Code": "EntryNotFound"})
                    return
                self._reply(200, entries)

            def _serve(self) -> bool:
                """Answer a read of a served repo; False when the request is none of those."""
                parts = self._parts()
                if parts == ["api", "agent-harnesses"]:
                    # huggingface_hub's user agent names the AI agent it runs under, from this registry
                    # (asked once a process, without a token): empty, none is named.
                    self._reply(200, {"standardEnvVars": [], "harnesses": {}})
                    return True
                if parts[:2] == ["api", "telemetry"]:
                    # Libraries report their use to the Hub they talk to (TRL: each SFTTrainer).
                    hub.telemetry.append("/".join(parts[2:]))
                    self._reply(200, {})
                    return True
                hub.auth_headers.append(self.headers.get("Authorization"))
                if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                    repo = "/".join(parts[2:4])
                    if len(parts) == 4:
                        self._info(repo, "main")
                        return True
                    if parts[4] == "revision" and len(parts) == 6:
                        self._info(repo, parts[5])
                        return True
                    if parts[4] == "tree" and len(parts) >= 6:
                        self._tree(repo, parts[5], "/".join(parts[6:]))
                        return True
                if len(parts) >= 5 and parts[2] == "resolve":
                    self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
                    return True
                return False

            def do_HEAD(self) -> None:
                if not self._serve():
                    hub.unknown.append(f"HEAD {self.path}")
                    self._reply(404, {})

            def do_GET(self) -> None:
                if not self._serve():
                    hub.unknown.append(f"GET {self.path}")
                    self._reply(404, {"error": f"the stand-in Hub does not implement GET {self.path}"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def serve_model(
        self, repo_id: str, folder: Path, *, card_data: dict[str, Any] | None = None, branch: str = "main"
    ) -> str:
        """Serve `folder` as the model repository `repo_id`, its `branch` at one commit; returns it."""
        commit = folder_commit(folder)
        self.served[repo_id] = ServedRepo(folder, commit, dict(card_data or {}), {branch: commit})
        return commit

    def point(self, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
        """Send every huggingface_hub, transformers and peft call of this test here, with its own download
        cache. huggingface_hub reads HF_ENDPOINT once, at import (its module-level HfApi, behind
        ``file_exists`` and friends, keeps that endpoint); transformers keeps one HfApi of its own."""
        import huggingface_hub.constants as constants
        import huggingface_hub.hf_api as hf_api
        import transformers.utils.hub as transformers_hub

        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
        monkeypatch.setattr(hf_api.api, "endpoint", self.url)

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
