"""``<output>/progress.json``: the run's state, written atomically, read by the operator (and by people).

Fields: ``state``, ``step``, ``total_steps``, ``loss``, ``eta_seconds``, ``epoch``, ``updated_at`` (RFC 3339,
UTC), plus ``eval_loss`` once evaluated and ``message`` on failure. ``state`` is one of :data:`STATES`.
Only the main process writes it.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from kubetune.render import ANNOTATION_PROGRESS

ProgressState = Literal[
    "Loading",  # reading the spec, data and model
    "Training",
    "Evaluating",
    "Saving",  # adapter, samples, merged model, card
    "Pushing",  # to the Hub
    "Succeeded",
    "Failed",
    "Preempted",  # SIGTERM: a checkpoint was saved, the next start resumes from it
]
STATES: tuple[str, ...] = ProgressState.__args__  # type: ignore[attr-defined]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class PodReporter:
    """Mirrors progress onto this Pod's `kubetune.io/progress` annotation, which the operator turns into
    the Progress / Loss / ETA columns of `kubectl get ftj`.

    In a Pod it uses the Pod's ServiceAccount token (the trainer needs `patch` on pods in its namespace)
    and the Downward-API variables the Job sets. Best effort: a refused or failed report never disturbs
    training; after a 401/403 it stops trying, with one warning."""

    MIN_INTERVAL_SECONDS = 10.0

    def __init__(
        self,
        pod: str | None,
        namespace: str | None,
        server: str | None,
        token: str | None,
        ca_file: str | None = None,
    ) -> None:
        self.url = (
            f"{server}/api/v1/namespaces/{namespace}/pods/{pod}" if pod and namespace and server else None
        )
        self.token = token
        self.ca_file = ca_file
        self.enabled = bool(self.url and token)
        self._last = 0.0

    @classmethod
    def from_environment(cls, env: Any = os.environ) -> PodReporter:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        token_file, ca_file = SA_DIR / "token", SA_DIR / "ca.crt"
        token = token_file.read_text().strip() if token_file.is_file() else None
        server = f"https://{host}:{port}" if host else None
        return cls(
            env.get("KUBETUNE_POD_NAME"),
            env.get("KUBETUNE_POD_NAMESPACE"),
            server,
            token,
            str(ca_file) if ca_file.is_file() else None,
        )

    def report(self, data: dict[str, Any], force: bool = False) -> None:
        import time

        if not self.enabled or (not force and time.monotonic() - self._last < self.MIN_INTERVAL_SECONDS):
            return
        self._last = time.monotonic()
        import logging
        import ssl
        import urllib.error
        import urllib.request

        body = json.dumps({"metadata": {"annotations": {ANNOTATION_PROGRESS: json.dumps(data)}}}).encode()
        assert self.url is not None
        req = urllib.request.Request(
            self.url,
            data=body,
            method="PATCH",
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/merge-patch+json",
            },
        )
        context = ssl.create_default_context(cafile=self.ca_file) if self.url.startswith("https") else None
        try:
            with urllib.request.urlopen(req, timeout=5, context=context):
                pass
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                self.enabled = False
                logging.getLogger("kubetune.trainer").warning(
                    "progress is not shown in `kubectl get ftj`: this Pod's ServiceAccount may not patch "
                    "pods (HTTP %d); grant it `patch` on pods to see Progress/Loss/ETA",
                    e.code,
                )
        except (OSError, ValueError):
            pass  # the next report tries again


class ProgressFile:
    """The last known progress, rewritten on every update (a no-op off the main process), and mirrored
    onto the Pod for the operator."""

    def __init__(self, path: Path, enabled: bool = True, reporter: PodReporter | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.reporter = reporter if reporter is not None else PodReporter.from_environment()
        self.data: dict[str, Any] = {
            "state": "Loading",
            "step": 0,
            "total_steps": None,
            "loss": None,
            "eta_seconds": None,
            "epoch": None,
            "updated_at": None,
        }

    def update(self, state: ProgressState | None = None, **fields: Any) -> None:
        if state is not None:
            self.data["state"] = state
        self.data.update(fields)
        self.data["updated_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.enabled:
            write_json_atomic(self.path, self.data)
            # State changes go out at once; step updates at most every MIN_INTERVAL_SECONDS.
            self.reporter.report(self.data, force=state is not None)
