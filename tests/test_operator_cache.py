"""The informer glue (kubetune_operator.cache) and the operator's use of it, on plain dicts.

A scripted stand-in for kube.py's list_page and watch plays the API server: pages with continue
tokens, watch events, bookmarks, 410 Gone and outages. The real API server is in
tests/e2e/test_operator.py (the hundred FineTuneJobs, requests per object, quiet at rest, and a status
write of the operator's own that causes no second pass).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.rest import ApiException
from urllib3.exceptions import ReadTimeoutError

from kubetune.contract import LABEL_JOB, LABEL_RUN
from kubetune_operator import cache as cache_module
from kubetune_operator.cache import LAST_APPLIED, Cache, Informer, slim
from kubetune_operator.operator import Operator


def obj(name: str, rv: int, ftj: str | None = None, namespace: str = "ns", **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "resourceVersion": str(rv)}
    if ftj is not None:
        meta["labels"] = {LABEL_JOB: ftj}
    return {"kind": "Job", "metadata": meta, **extra}


class Script:
    """kube.py's list_page and watch, answering from a script. Each watch call takes the next entry
    of `watches`: a list of events, or an exception to raise. When the script runs out, `stop` is set."""

    def __init__(self, pages: list[list[dict[str, Any]]], watches: list[Any], rv: str = "10") -> None:
        self.pages = pages
        self.watches = watches
        self.rv = rv
        self.lists: list[str | None] = []  # the continue token of each page asked for
        self.watched: list[str] = []  # the resourceVersion of each watch
        self.stop = threading.Event()
        self.on_request = None

    def list_page(
        self,
        kind: str,
        namespace: str | None,
        selector: str | None,
        *,
        limit: int = 500,
        continue_: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None, str]:
        self.lists.append(continue_)
        i = int(continue_ or 0)
        token = str(i + 1) if i + 1 < len(self.pages) else None
        return [dict(o, metadata=dict(o["metadata"])) for o in self.pages[i]], token, self.rv

    def watch(
        self, kind: str, namespace: str | None, selector: str | None, rv: str, **_: Any
    ) -> Iterator[dict[str, Any]]:
        self.watched.append(rv)
        if not self.watches:
            self.stop.set()
            return
        step = self.watches.pop(0)
        if isinstance(step, BaseException):
            raise step
        yield from step

    def stop_watches(self) -> None:
        pass


def informer(script: Script, **kw: Any) -> tuple[Informer, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []

    def handler(kind: str, type_: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        seen.append((type_, (new or old or {})["metadata"]["name"]))

    return Informer(script, "Job", handler=handler, index_label=LABEL_JOB, **kw), seen  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "BACKOFF_MIN_SECONDS", 0.001)
    monkeypatch.setattr(cache_module, "BACKOFF_MAX_SECONDS", 0.004)


def test_a_paginated_list_then_a_watch_from_its_resource_version() -> None:
    pages = [[obj("a", 1, "x"), obj("b", 2, "x")], [obj("c", 3, "y")]]
    script = Script(pages, [[{"type": "ADDED", "object": obj("d", 11, "x")}]])
    inf, seen = informer(script)
    inf.run(script.stop)
    assert script.lists == [None, "1"] and script.watched[0] == "10"
    assert inf.synced.is_set()
    assert [o["metadata"]["name"] for o in inf.indexed("ns", "x")] == ["a", "b", "d"]
    assert [o["metadata"]["name"] for o in inf.indexed("ns", "y")] == ["c"]
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c"), ("ADDED", "d")]
    # The next watch resumes after the last event.
    assert script.watched[1] == "11"


def test_events_and_bookmarks_move_the_store_and_the_resume_point() -> None:
    events = [
        {"type": "MODIFIED", "object": obj("a", 12, "y")},  # moved to another FineTuneJob
        {"type": "BOOKMARK", "object": {"kind": "Job", "metadata": {"resourceVersion": "20"}}},
        {"type": "DELETED", "object": obj("b", 21, "x")},
    ]
    script = Script([[obj("a", 1, "x"), obj("b", 2, "x")]], [events, []])
    inf, seen = informer(script)
    inf.run(script.stop)
    assert seen[2:] == [("MODIFIED", "a"), ("DELETED", "b")]  # no handler call for the bookmark
    assert inf.indexed("ns", "x") == [] and [o["metadata"]["name"] for o in inf.indexed("ns", "y")] == ["a"]
    assert script.watched == ["10", "21", "21"]


def test_a_bookmark_alone_advances_the_resume_point() -> None:
    bookmark = {"type": "BOOKMARK", "object": {"kind": "Job", "metadata": {"resourceVersion": "50"}}}
    script = Script([[obj("a", 1, "x")]], [[bookmark]])
    inf, _ = informer(script)
    inf.run(script.stop)
    assert script.watched == ["10", "50"]


@pytest.mark.parametrize(
    "gone",
    [
        [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}],
        ApiException(status=410, reason="Gone"),
    ],
    ids=["error-event", "api-exception"],
)
def test_410_gone_relists_and_the_difference_is_handed_on(
    gone: Any, caplog: pytest.LogCaptureFixture
) -> None:
    script = Script([[obj("a", 1, "x"), obj("b", 2, "x"), obj("c", 3, "x")]], [gone])
    inf, seen = informer(script)
    # What the relist finds: a unchanged, b changed, c gone, d new.
    original = script.list_page

    def relist(*args: Any, **kw: Any) -> Any:
        if len(script.lists) >= 1:
            script.pages = [[obj("a", 1, "x"), obj("b", 5, "x"), obj("d", 6, "x")]]
            script.rv = "30"
        return original(*args, **kw)

    script.list_page = relist  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="kubetune.operator"):
        inf.run(script.stop)
    assert seen[3:] == [("DELETED", "c"), ("MODIFIED", "b"), ("ADDED", "d")]
    assert sorted(o["metadata"]["name"] for o in inf.items()) == ["a", "b", "d"]
    assert script.watched == ["10", "30"]
    assert "Job watch expired (410 Gone); relisting" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_outage_is_one_warning_then_one_line_when_it_is_over(caplog: pytest.LogCaptureFixture) -> None:
    down = ApiException(status=503, reason="Service Unavailable")
    down.headers = {"Audit-Id": "abc", "Content-Type": "application/json"}
    down.body = '{"kind":"Status","message":"the server is shutting down"}'
    bookmark = {"type": "BOOKMARK", "object": {"kind": "Job", "metadata": {"resourceVersion": "40"}}}
    script = Script([[obj("a", 1, "x")]], [down, down, down, [bookmark]])
    inf, _ = informer(script)
    with caplog.at_level(logging.DEBUG, logger="kubetune.operator"):
        inf.run(script.stop)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Job watch failed (503 Service Unavailable" in warnings[0]
    assert "Audit-Id" not in caplog.text and "\n" not in warnings[0]
    assert (
        len([r for r in caplog.records if r.levelno == logging.DEBUG and "failed again" in r.getMessage()])
        == 2
    )
    assert any(r.getMessage().startswith("Job watch recovered after") for r in caplog.records)
    assert script.watched == ["10", "10", "10", "10", "40"]  # resumed where it was, no relist


def test_a_silent_watch_is_cut_by_its_read_timeout_and_watched_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    silent = ReadTimeoutError(None, "/apis/batch/v1/jobs", "Read timed out. (read timeout=90.0)")  # type: ignore[arg-type]
    script = Script([[obj("a", 1, "x")]], [silent, []])
    inf, _ = informer(script)
    with caplog.at_level(logging.INFO, logger="kubetune.operator"):
        inf.run(script.stop)
    assert script.watched == ["10", "10", "10"] and script.lists == [None]  # same point, no relist
    assert "Job watch heard nothing for too long" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_progress_is_when_the_api_server_was_last_heard() -> None:
    now = [100.0]
    script = Script([[obj("a", 1, "x")]], [ApiException(status=500, reason="Internal")])
    inf, _ = informer(script, clock=lambda: now[0])
    now[0] = 200.0
    inf.run(script.stop)  # the list answered at 200; the watch only failed
    assert inf.last_progress == 200.0
    c = Cache(script)  # type: ignore[arg-type]
    c.informers = {"Job": inf}
    now[0] = 200.0 + 30
    assert c.stalled(60) == []
    now[0] = 200.0 + 61
    assert c.stalled(60) == ["Job"]


def test_stored_objects_are_slim() -> None:
    big = obj("a", 1, "x")
    big["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    big["metadata"]["annotations"] = {LAST_APPLIED: "{...}", "keep": "me"}
    assert slim(big)["metadata"] == {
        "name": "a",
        "namespace": "ns",
        "resourceVersion": "1",
        "labels": {LABEL_JOB: "x"},
        "annotations": {"keep": "me"},
    }
    # Decisions read a Pod's metadata and status, and a Job's own fields: the rest is not kept.
    pod = {"metadata": {"name": "p"}, "spec": {"nodeName": "n", "containers": [{"env": []}]}, "status": {}}
    assert slim(pod, "Pod") == {"metadata": {"name": "p"}, "spec": {"nodeName": "n"}, "status": {}}
    job = {"kind": "Job", "metadata": {}, "spec": {"suspend": False, "template": {"spec": {}}}}
    assert slim(job)["spec"] == {"suspend": False}


def test_a_write_answer_is_kept_and_an_older_event_does_not_undo_it() -> None:
    inf, seen = informer(Script([], []))
    inf.replace([obj("a", 1, "x")])
    inf.store(obj("a", 7, "x", spec={"suspend": True}))
    inf.apply("MODIFIED", obj("a", 5, "x"))  # in flight before the write
    assert inf.get("ns", "a")["spec"] == {"suspend": True}  # type: ignore[index]
    inf.apply("MODIFIED", obj("a", 7, "x", spec={"suspend": True}))  # the write's own event
    assert seen == [("ADDED", "a"), ("MODIFIED", "a")]


def test_the_cache_answers_by_finetunejob_run_and_name() -> None:
    c = Cache(Script([], []))  # type: ignore[arg-type]
    pod = {
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "labels": {LABEL_JOB: "x", LABEL_RUN: "x-1"}},
    }
    old = {
        "kind": "Pod",
        "metadata": {"name": "q", "namespace": "ns", "labels": {LABEL_JOB: "x", LABEL_RUN: "x-0"}},
    }
    c.informers["Pod"].replace([pod, old])
    c.store({"kind": "PersistentVolumeClaim", "metadata": {"name": "x-workspace", "namespace": "ns"}})
    c.store({"kind": "ConfigMap", "metadata": {"name": "x-1", "namespace": "ns"}})  # not cached: ignored
    assert [p["metadata"]["name"] for p in c.pods("ns", "x", "x-1")] == ["p"]
    assert c.pods("other", "x", "x-1") == []
    assert c.claim("ns", "x-workspace") is not None and c.jobs("ns", "x") == []


# The operator's handler ---------------------------------------------------------------------------------


def ftj(rv: int, status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ns", "resourceVersion": str(rv), "generation": 1},
        "spec": {"model": {"id": "a/b"}, **spec},
    }
    if status is not None:
        out["status"] = status
    return out


def test_the_operators_own_status_write_causes_no_pass_and_anything_else_does() -> None:
    op = Operator(Script([], []), workers=1)  # type: ignore[arg-type]
    ftjs = op.cache.informers["FineTuneJob"]
    ftjs.apply("ADDED", ftj(1))
    assert op.queue.get() == ("ns", "demo")
    op.queue.done(("ns", "demo"))
    ours = {"state": "Pending", "reason": "Starting"}
    op.reconciler._written[("ns", "demo")] = ours
    ftjs.apply("MODIFIED", ftj(2, ours))
    assert len(op.queue) == 0 and op.own_writes_skipped == 1
    # Someone else's status (or a status that is not what we wrote): a pass.
    ftjs.apply("MODIFIED", ftj(3, {"state": "Running"}))
    assert len(op.queue) == 1
    op.queue.get()
    op.queue.done(("ns", "demo"))
    # Our status, but the spec changed too: a pass.
    ftjs.apply("MODIFIED", ftj(4, ours, dataset={"id": "c/d"}))
    assert len(op.queue) == 1
    op.queue.get()
    op.queue.done(("ns", "demo"))
    # A child's change wakes its FineTuneJob; a deleted FineTuneJob is forgotten, not reconciled.
    op.cache.informers["Job"].apply("ADDED", obj("demo-1", 5, "demo"))
    assert op.queue.get() == ("ns", "demo")
    op.queue.done(("ns", "demo"))
    ftjs.apply("DELETED", ftj(6, ours))
    assert len(op.queue) == 0 and ("ns", "demo") not in op.reconciler._written
    # A claim binding changes nothing plan() reads; a new owner does.
    claims = op.cache.informers["PersistentVolumeClaim"]
    claims.apply("ADDED", obj("demo-workspace", 7, "demo", status={"phase": "Pending"}))
    op.queue.get()
    op.queue.done(("ns", "demo"))
    claims.apply("MODIFIED", obj("demo-workspace", 8, "demo", status={"phase": "Bound"}))
    assert len(op.queue) == 0
    owned = obj("demo-workspace", 9, "demo", status={"phase": "Bound"})
    owned["metadata"]["ownerReferences"] = [{"uid": "u"}]
    claims.apply("MODIFIED", owned)
    assert len(op.queue) == 1


def test_alive_needs_every_watch_to_make_progress() -> None:
    op = Operator(Script([], []), workers=1, watch_stall_seconds=60)  # type: ignore[arg-type]
    assert op.alive()
    op.informers[1].last_progress -= 61
    assert not op.alive()
