"""The trainer's progress reports onto its Pod, against a local HTTP endpoint standing in for the API
server (the real API server is used in tests/e2e/test_operator.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kubetune.render import ANNOTATION_PROGRESS
from kubetune.trainer.progress import PodReporter


class Endpoint:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_PATCH(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
                )
                self.send_response(outer.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    yield e
    e.server.shutdown()


def test_reports_throttled_and_stops_when_refused(endpoint: Endpoint) -> None:
    reporter = PodReporter("trainer-0", "team-a", endpoint.url, "sa-token")
    reporter.report({"state": "Training", "step": 1}, force=True)
    reporter.report({"state": "Training", "step": 2})  # within the interval: dropped
    assert len(endpoint.requests) == 1
    req = endpoint.requests[0]
    assert req["path"] == "/api/v1/namespaces/team-a/pods/trainer-0"
    assert req["headers"]["Authorization"] == "Bearer sa-token"
    assert req["headers"]["Content-Type"] == "application/merge-patch+json"
    assert json.loads(req["body"]["metadata"]["annotations"][ANNOTATION_PROGRESS]) == {
        "state": "Training",
        "step": 1,
    }

    endpoint.status = 403
    reporter.report({"state": "Evaluating"}, force=True)
    reporter.report({"state": "Succeeded"}, force=True)
    assert len(endpoint.requests) == 2 and not reporter.enabled


def test_outside_a_pod_it_does_nothing() -> None:
    reporter = PodReporter.from_environment({})
    assert not reporter.enabled
    reporter.report({"state": "Training"}, force=True)
