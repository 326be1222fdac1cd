"""The operator's /metrics: reconcile, queue and API request figures, FineTuneJobs by state and the
training gauges of running jobs, computed from the cache at scrape time with a bounded number of series."""

from __future__ import annotations

import threading
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.contract import progress_line
from kubetune.durations import format_duration
from kubetune_operator.serve import (
    JOB_GAUGES,
    STATES,
    Metrics,
    duration_seconds,
)
from kubetune_operator.status import progress_fields

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def ftj(name: str, state: str | None, namespace: str = "team-a", **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
    }
    if state is not None:
        obj["status"] = {"state": state, **status}
    return obj


def scrape(metrics: Metrics) -> Samples:
    """Every sample /metrics serves, over HTTP as Prometheus reads it."""
    server = metrics.listen("127.0.0.1:0")
    try:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def named(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def job_gauge(samples: Samples, name: str) -> dict[tuple[str, str], float]:
    return {(dict(k)["namespace"], dict(k)["name"]): v for k, v in named(samples, name).items()}


@pytest.fixture
def cache() -> list[dict[str, Any]]:
    """The FineTuneJobs the operator's cache holds (a list the test changes between scrapes)."""
    return []


def test_reconcile_queue_leader_and_api_request_figures(cache: list[dict[str, Any]]) -> None:
    depth = [0]
    metrics = Metrics(lambda: depth[0], lambda: cache)
    metrics.reconciles.labels("ok").inc(3)
    metrics.reconciles.labels("error").inc()
    with metrics.duration.time():
        pass
    metrics.leader.set(1)
    depth[0] = 7
    for verb, resource in [("get", "pods/log"), ("list", "jobs"), ("list", "jobs"), ("patch", "status")]:
        metrics.request(verb, resource)

    s = scrape(metrics)
    assert named(s, "kubetune_reconciles_total") == {(("result", "ok"),): 3.0, (("result", "error"),): 1.0}
    assert s[("kubetune_reconcile_duration_seconds_count", ())] == 1.0
    assert s[("kubetune_leader", ())] == 1.0
    assert s[("kubetune_workqueue_depth", ())] == 7.0  # read at scrape time
    assert named(s, "kubetune_api_requests_total") == {
        (("resource", "pods/log"), ("verb", "get")): 1.0,
        (("resource", "jobs"), ("verb", "list")): 2.0,
        (("resource", "status"), ("verb", "patch")): 1.0,
    }


def test_finetunejobs_by_state_every_state_present(cache: list[dict[str, Any]]) -> None:
    metrics = Metrics(lambda: 0, lambda: cache)
    by_state = named(scrape(metrics), "kubetune_finetunejobs")
    assert by_state == {(("state", st),): 0.0 for st in (*STATES, "Unknown")}
    assert set(STATES) == {"Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed"}

    cache += [ftj("a", "Running"), ftj("b", "Running"), ftj("c", "Succeeded"), ftj("d", "Failed")]
    cache += [ftj("new", None), ftj("odd", "Exploded"), {"metadata": {"name": "junk"}, "status": "x"}]
    by_state = named(scrape(metrics), "kubetune_finetunejobs")
    assert {dict(k)["state"]: v for k, v in by_state.items() if v} == {
        "Running": 2.0,
        "Succeeded": 1.0,
        "Failed": 1.0,
        "Unknown": 3.0,  # not reconciled yet, or nothing this version knows
    }


def test_training_gauges_of_running_jobs_follow_the_cache(cache: list[dict[str, Any]]) -> None:
    metrics = Metrics(lambda: 0, lambda: cache)
    cache += [
        ftj(
            "tune",
            "Running",
            loss="1.2346",
            step=37,
            totalSteps=100,
            eta="1h12m",
            tokensPerSecond=5120,
            startTime="2026-01-01T00:00:00Z",
        ),
        ftj("fresh", "Running", namespace="team-b", eta="?"),  # no report yet: no sample, no error
        ftj("done", "Succeeded", loss="0.5", step=100, totalSteps=100, tokensPerSecond=9000),
        ftj("waiting", "Pending", step=0),
    ]
    s = scrape(metrics)
    assert job_gauge(s, "kubetune_job_loss") == {("team-a", "tune"): 1.2346}
    assert job_gauge(s, "kubetune_job_step") == {("team-a", "tune"): 37.0}
    assert job_gauge(s, "kubetune_job_total_steps") == {("team-a", "tune"): 100.0}
    assert job_gauge(s, "kubetune_job_eta_seconds") == {("team-a", "tune"): 4320.0}
    assert job_gauge(s, "kubetune_job_tokens_per_second") == {("team-a", "tune"): 5120.0}
    assert s[("kubetune_job_series_dropped", ())] == 0.0

    # The job finishes: its series leave /metrics with nothing to clean up.
    cache[0] = ftj("tune", "Succeeded", loss="1.0", step=100, totalSteps=100)
    s = scrape(metrics)
    for name, *_ in JOB_GAUGES:
        assert job_gauge(s, name) == {}, name


def test_per_job_series_are_bounded_newest_runs_first(cache: list[dict[str, Any]]) -> None:
    metrics = Metrics(lambda: 0, lambda: cache, job_series_max=3)
    for i in range(8):
        cache.append(ftj(f"job-{i}", "Running", step=i, startTime=f"2026-01-01T00:0{i}:00Z"))
    cache.append(ftj("no-start", "Running", step=99))  # no startTime yet: after every started one
    s = scrape(metrics)
    assert set(job_gauge(s, "kubetune_job_step")) == {("team-a", f"job-{i}") for i in (7, 6, 5)}
    assert s[("kubetune_job_series_dropped", ())] == 6.0
    for name, *_ in JOB_GAUGES:
        assert len(job_gauge(s, name)) <= 3, name
    # The default cap holds at scale too.
    many = [
        ftj(f"j{i:04d}", "Running", step=i, startTime=f"2026-01-01T{i // 60 % 24:02d}:00:00Z")
        for i in range(1000)
    ]
    s = scrape(Metrics(lambda: 0, lambda: many))
    assert len(job_gauge(s, "kubetune_job_step")) == 200
    assert s[("kubetune_job_series_dropped", ())] == 800.0


def test_the_trainers_report_reaches_the_gauges_through_the_status() -> None:
    """Progress line (trainer) -> status fields (operator) -> gauges (scrape): one chain, typed."""
    line = progress_line(
        {"state": "Training", "step": 40, "total_steps": 160, "loss": 0.98765, "eta_seconds": 754.4,
         "tokens_per_second": 2048.6}
    )  # fmt: skip
    status = {"state": "Running", **progress_fields(f"2026-01-01T00:00:00Z stdout F {line}\n")}
    assert status["tokensPerSecond"] == 2049 and status["eta"] == "12m34s" and status["loss"] == "0.9877"
    s = scrape(Metrics(lambda: 0, lambda: [{"metadata": {"namespace": "n", "name": "j"}, "status": status}]))
    assert job_gauge(s, "kubetune_job_tokens_per_second") == {("n", "j"): 2049.0}
    assert job_gauge(s, "kubetune_job_eta_seconds") == {("n", "j"): 754.0}
    assert job_gauge(s, "kubetune_job_loss") == {("n", "j"): 0.9877}
    assert job_gauge(s, "kubetune_job_step") == {("n", "j"): 40.0}


def test_duration_seconds_reads_what_format_duration_writes() -> None:
    for seconds in (0, 1, 59, 60, 61, 754, 3599):
        assert duration_seconds(format_duration(seconds)) == seconds
    for seconds in (3600, 4320, 86400 + 120, 360000):  # hours and minutes: exact to the minute
        assert duration_seconds(format_duration(seconds)) == seconds
    assert duration_seconds(format_duration(4330)) == 4320  # `1h12m`
    for bad in ("?", "", "soon", "1d", "-5s", None, 12, "1h2x"):
        assert duration_seconds(bad) is None, bad
