"""The fit check (kubetune_operator.fit): does a new run fit the memory of its GPU, and what the operator
does when it does not (`Unfit`: nothing created, the numbers in the message, one Warning event).

The decisions are pure and tested here with plain dicts; the reads (the nodes' labels, the model's
config.json) are stand-in functions with a counter, so memoization and the background fetch are tested
without a network. The real API server and a stand-in Hub are in tests/e2e/test_operator_unfit.py.
"""

from __future__ import annotations

import copy
import threading
from datetime import timedelta
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from kubetune import plan as planner
from kubetune.contract import REASON_UNFIT
from kubetune_operator import fit as fitmod
from kubetune_operator.fit import (
    FAILURE_TTL_SECONDS,
    NODES_TTL_SECONDS,
    Fit,
    FitChecker,
    GpuMemory,
    decide,
    gpu_memory,
    node_selector,
)
from kubetune_operator.plan import UNFIT_RESYNC_SECONDS, Create, Observed, plan
from test_operator_plan import NOW, ftj, model, trainer_job
from test_operator_reconcile import FakeKube, reconciler, settle

GIB = 1024**3
# Llama-2-70B- and Llama-2-7B-shaped config.json files (shapes only: no weights anywhere).
LLAMA_70B = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}
LLAMA_7B = {**LLAMA_70B, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32}
LLAMA_7B.update(num_attention_heads=32, num_key_value_heads=32)
RTX_4090 = {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090", "nvidia.com/gpu.memory": "24564"}


def gpu_job(**resources: Any) -> dict[str, Any]:
    return ftj(model={"id": "shapes/llama-70b"}, resources={"gpusPerNode": 1, "memory": "64Gi", **resources})


class Stand:
    """The checker's two reads, played by functions: node labels by selector, and shapes by model."""

    def __init__(self, nodes: list[dict[str, str]] | None = None) -> None:
        self.nodes = [RTX_4090] if nodes is None else nodes
        self.configs: dict[str, dict[str, Any]] = {"shapes/llama-70b": LLAMA_70B}
        self.listed: list[str] = []
        self.fetched: list[tuple[str, str]] = []
        self.list_error: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.ready: list[set[tuple[str, str]]] = []
        self.done = threading.Event()
        self.now = 0.0

    def list_nodes(self, selector: str) -> list[dict[str, str]]:
        self.listed.append(selector)
        if self.list_error is not None:
            raise self.list_error
        terms = [t.split("=", 1) for t in selector.split(",")]
        return [n for n in self.nodes if all(t[0] in n and (len(t) == 1 or n[t[0]] == t[1]) for t in terms)]

    def fetch(self, repo: str, revision: str) -> planner.ModelShape:
        self.fetched.append((repo, revision))
        self.gate.wait(10)
        if repo not in self.configs:
            raise planner.PlanError(f"model {repo} not found on the Hub")
        return planner.shape_from_config(self.configs[repo])

    def on_ready(self, keys: Any) -> None:
        self.ready.append(set(keys))
        self.done.set()

    def checker(self, **kw: Any) -> FitChecker:
        return FitChecker(
            None,
            on_ready=self.on_ready,
            fetch=self.fetch,
            list_nodes=self.list_nodes,
            clock=lambda: self.now,
            **kw,
        )


def settled(checker: FitChecker, stand: Stand, job: dict[str, Any]) -> Fit | None:
    """The verdict once the model's config.json has arrived (the first check only starts the fetch)."""
    first = checker.check(("team-a", "demo"), model(job))
    if first is None or first.verdict != "waiting":
        return first
    assert stand.done.wait(10), "the fetch never reported"
    return checker.check(("team-a", "demo"), model(job))


# --------------------------------------------------------------------------------------------------
# Pure: which nodes, how much memory, the decision
# --------------------------------------------------------------------------------------------------


def test_the_selector_is_the_pods_own_placement_plus_the_memory_label() -> None:
    job = model(gpu_job(gpuType="NVIDIA-L4", nodeSelector={"pool": "train"}))
    assert node_selector(job) == "nvidia.com/gpu.product=NVIDIA-L4,pool=train,nvidia.com/gpu.memory"
    assert node_selector(model(gpu_job())) == "nvidia.com/gpu.memory"


def test_memory_comes_from_the_largest_labelled_node_then_the_table_then_nothing() -> None:
    job = model(gpu_job())
    nodes = [
        {"nvidia.com/gpu.memory": "24564", "nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"},
        {"nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        {"nvidia.com/gpu.memory": "lots"},  # not a number: ignored
    ]
    got = gpu_memory(job, nodes)
    assert got is not None
    assert (got.bytes, got.product) == (81920 * 2**20, "NVIDIA-A100-SXM4-80GB")
    assert "nvidia.com/gpu.memory=81920" in got.source and "3 matching nodes" in got.source
    # No node says, or they cannot be listed: the gpuType table.
    l4 = model(gpu_job(gpuType="NVIDIA-L4"))
    listings: list[list[dict[str, str]] | None] = [[], None]
    for listing in listings:
        table = gpu_memory(l4, listing)
        assert table is not None and table.bytes == planner.GPUS["NVIDIA-L4"].memory_bytes
        assert table.source == "gpuType table (NVIDIA-L4)"
    # Nothing known: not checked.
    assert gpu_memory(job, []) is None
    assert gpu_memory(model(gpu_job(gpuType="ACME-Accelerator-9000")), []) is None


def test_a_70b_model_does_not_fit_24_gib_and_the_message_has_the_numbers() -> None:
    job = model(gpu_job())
    shape = planner.shape_from_config(LLAMA_70B)
    gpu = GpuMemory(24564 * 2**20, "node label nvidia.com/gpu.memory=24564 (1 matching node)", None)
    verdict = decide(job, shape, gpu)
    est = planner.estimate(job.spec, shape)
    assert est.total_bytes > gpu.bytes
    assert verdict.verdict == "unfit"
    assert verdict.message == planner.unfit_message(est, gpu.bytes, gpu.source)
    assert planner.fmt_bytes(est.total_bytes) in verdict.message and "24.0 GiB" in verdict.message
    assert "weights" in verdict.message and "perDeviceBatchSize" in verdict.message

    big = decide(job, shape, GpuMemory(81920 * 2**20, "gpuType table (NVIDIA-A100-SXM4-80GB)", None))
    assert big.verdict == "fits" and "of 80.0 GiB (gpuType table (NVIDIA-A100-SXM4-80GB))" in big.message
    small = decide(job, planner.shape_from_config(LLAMA_7B), gpu)
    assert small.verdict == "fits" and small.message.startswith("GPU memory checked: the planner estimates")


# --------------------------------------------------------------------------------------------------
# The checker: what it reads, and how often
# --------------------------------------------------------------------------------------------------


def test_nothing_is_read_for_a_cpu_run_and_a_model_path_is_not_checked() -> None:
    stand = Stand()
    checker = stand.checker()
    assert checker.check(("ns", "cpu"), model(ftj(resources={"gpusPerNode": 0}))) is None
    assert stand.listed == []
    local = ftj(resources={"gpusPerNode": 1}, model={"path": "/workspace/models/llama"})
    verdict = checker.check(("ns", "local"), model(local))
    assert verdict is not None and verdict.verdict == "unchecked"
    assert "model.path" in verdict.message and "does not read" in verdict.message
    assert stand.fetched == []


def test_unknown_gpu_memory_is_not_checked_and_the_model_is_not_fetched() -> None:
    stand = Stand(nodes=[])
    verdict = stand.checker().check(("ns", "x"), model(gpu_job(gpuType="ACME-Accelerator-9000")))
    assert verdict is not None and verdict.verdict == "unchecked"
    assert "ACME-Accelerator-9000" in verdict.message and "nvidia.com/gpu.memory" in verdict.message
    assert stand.fetched == []


def test_the_config_is_fetched_once_in_the_background_and_its_arrival_wakes_who_waited() -> None:
    stand = Stand()
    stand.gate.clear()  # the Hub is slow
    checker = stand.checker()
    a, b = model(gpu_job()), model(gpu_job())
    first = checker.check(("team-a", "a"), a)
    second = checker.check(("team-a", "b"), b)
    assert first is not None and second is not None
    assert (first.verdict, second.verdict) == ("waiting", "waiting")
    assert first.retry == pytest.approx(fitmod.WAIT_SECONDS)
    stand.gate.set()
    assert stand.done.wait(10)
    assert stand.ready == [{("team-a", "a"), ("team-a", "b")}]
    verdict = checker.check(("team-a", "a"), a)
    assert verdict is not None and verdict.verdict == "unfit"
    assert stand.fetched == [("shapes/llama-70b", "main")]  # one fetch for both, and memoized after


def test_a_hub_that_does_not_answer_in_time_lets_the_run_start_unchecked() -> None:
    stand = Stand()
    stand.gate.clear()
    checker = stand.checker(wait=5.0)
    job = model(gpu_job())
    assert checker.check(("ns", "x"), job).verdict == "waiting"  # type: ignore[union-attr]
    stand.now = 5.0
    late = checker.check(("ns", "x"), job)
    assert late is not None and late.verdict == "unchecked" and "within 5 s" in late.message
    stand.gate.set()


def test_a_failed_fetch_is_not_checked_then_tried_again_never_unfit() -> None:
    stand = Stand()
    checker = stand.checker()
    job = ftj(model={"id": "gone/model"}, resources={"gpusPerNode": 1})
    verdict = settled(checker, stand, job)
    assert verdict is not None and verdict.verdict == "unchecked"
    assert "cannot read config.json of gone/model" in verdict.message and "not found" in verdict.message
    assert checker.check(("team-a", "demo"), model(job)).verdict == "unchecked"  # type: ignore[union-attr]
    assert len(stand.fetched) == 1  # memoized for a while ...
    stand.now += FAILURE_TTL_SECONDS + 1
    stand.configs["gone/model"] = LLAMA_70B
    stand.done.clear()
    assert settled(checker, stand, job).verdict == "unfit"  # type: ignore[union-attr]
    assert len(stand.fetched) == 2  # ... then fetched again


def test_node_labels_are_listed_once_per_selector_within_their_ttl() -> None:
    stand = Stand()
    checker = stand.checker()
    job = gpu_job()
    assert settled(checker, stand, job).verdict == "unfit"  # type: ignore[union-attr]
    checker.check(("ns", "other"), model(job))
    assert stand.listed == ["nvidia.com/gpu.memory"]
    # Relabelled: a bigger GPU. Seen once the listing is older than its TTL.
    stand.nodes = [{"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.memory": "81920"}]
    assert checker.check(("ns", "x"), model(job)).verdict == "unfit"  # type: ignore[union-attr]
    stand.now += NODES_TTL_SECONDS + 1
    assert checker.check(("ns", "x"), model(job)).verdict == "fits"  # type: ignore[union-attr]
    assert len(stand.listed) == 2


def test_nodes_that_cannot_be_listed_fall_back_to_the_table() -> None:
    stand = Stand()
    stand.list_error = ApiException(status=403, reason="Forbidden")
    checker = stand.checker()
    verdict = settled(checker, stand, gpu_job(gpuType="NVIDIA-GeForce-RTX-4090"))
    assert verdict is not None and verdict.verdict == "unfit" and "gpuType table" in verdict.message
    assert settled(checker, stand, gpu_job()).verdict == "unchecked"  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# plan(): Unfit like a policy violation, decided again until the run starts
# --------------------------------------------------------------------------------------------------

UNFIT = Fit("unfit", "needs about 58.7 GiB per GPU but the GPU has 24.0 GiB (node label ...)")
FITS = Fit("fits", "GPU memory checked: the planner estimates 8.5 GiB per GPU of 24.0 GiB (node label ...)")


def observed(obj: dict[str, Any], fit: Fit | None, **kw: Any) -> Observed:
    return Observed(obj, model(obj), secret="present", fit=fit, **kw)


def test_unfit_creates_nothing_and_says_why_once() -> None:
    obj = gpu_job()
    p = plan(observed(obj, UNFIT), NOW)
    assert p.actions == []
    assert (p.status["state"], p.status["reason"]) == ("Failed", REASON_UNFIT)
    failed = next(c for c in p.status["conditions"] if c["type"] == "Failed")
    assert failed["message"].startswith(UNFIT.message) and "checked again" in failed["message"]
    valid = next(c for c in p.status["conditions"] if c["type"] == "Valid")
    assert (valid["status"], valid["reason"]) == ("False", REASON_UNFIT)
    assert [(e.type, e.reason) for e in p.events] == [("Warning", REASON_UNFIT)]
    assert p.requeue == UNFIT_RESYNC_SECONDS
    # The next pass (the recheck) sees the same: the same status, no second event.
    again = plan(observed({**obj, "status": p.status}, UNFIT), NOW + timedelta(minutes=2))
    assert again.status == p.status and again.events == [] and again.actions == []


def test_a_fix_starts_the_run_and_the_verdict_travels_with_run_created() -> None:
    obj = gpu_job()
    refused = plan(observed(obj, UNFIT), NOW).status
    # Same spec, a relabelled node (or a spec fix: a new hash, a new run, the same path).
    p = plan(observed({**obj, "status": refused}, FITS), NOW + timedelta(minutes=2))
    creates = [a for a in p.actions if isinstance(a, Create)]
    assert {a.obj["kind"] for a in creates} >= {"ConfigMap", "Job"}
    [job_create] = [a for a in creates if a.obj["kind"] == "Job"]
    assert job_create.event is not None and job_create.event.message.endswith(f"; {FITS.message}")
    assert p.status["state"] == "Pending" and "completionTime" not in p.status
    unchecked = Fit("unchecked", "GPU memory not checked: model.path is a folder ...")
    p = plan(observed(obj, unchecked), NOW)
    [job_create] = [a for a in p.actions if isinstance(a, Create) and a.obj["kind"] == "Job"]
    assert job_create.event is not None and "not checked" in job_create.event.message


def test_while_the_config_is_on_its_way_nothing_is_created_and_nothing_written() -> None:
    obj = gpu_job()
    p = plan(observed(obj, Fit("waiting", "reading config.json of a/b", retry=12.0)), NOW)
    assert (p.actions, p.status, p.events, p.requeue) == ([], {}, [], 12.0)


def test_a_run_whose_job_exists_is_never_refused() -> None:
    obj = gpu_job()
    running = plan(observed(obj, None, jobs=[trainer_job(obj)]), NOW)
    refused = plan(observed(obj, UNFIT, jobs=[trainer_job(obj)]), NOW)
    assert refused.status == running.status and refused.status["reason"] != REASON_UNFIT


# --------------------------------------------------------------------------------------------------
# The reconciler asks only before the Job exists, and an Unfit run needs no Secret check
# --------------------------------------------------------------------------------------------------


def rftj(model_id: str) -> dict[str, Any]:
    obj = ftj(model={"id": model_id}, resources={"gpusPerNode": 1})
    obj["metadata"]["namespace"] = "ns"
    return obj


def test_the_reconciler_checks_before_the_job_exists_and_never_after() -> None:
    stand = Stand()
    stand.configs["shapes/llama-7b"] = LLAMA_7B
    checker = stand.checker()
    kube = FakeKube(rftj("shapes/llama-7b"))
    r = reconciler(kube, fit=checker)
    assert r.reconcile("ns", "demo") == pytest.approx(fitmod.WAIT_SECONDS)  # waiting for config.json
    assert [c[0] for c in kube.calls] == []  # nothing sent: no Secret check, no create, no status
    assert stand.done.wait(10) and stand.ready == [{("ns", "demo")}]
    settle(r)
    [created] = [m for t, reason, m in kube.events if reason == "RunCreated"]
    assert "GPU memory checked: the planner estimates" in created
    calls = len(stand.listed)
    r2 = reconciler(kube, fit=checker)
    settle(r2)
    assert len(stand.listed) == calls  # the Job exists: not asked again


def test_an_unfit_run_costs_no_secret_check() -> None:
    stand = Stand()
    checker = stand.checker()
    kube = FakeKube(rftj("shapes/llama-70b"))
    r = reconciler(kube, fit=checker)
    r.reconcile("ns", "demo")
    assert stand.done.wait(10)
    assert r.reconcile("ns", "demo") == UNFIT_RESYNC_SECONDS
    assert [c[:2] for c in kube.calls] == [("event", "Event"), ("patch", "FineTuneJob/status")]
    assert kube.ftj["status"]["reason"] == REASON_UNFIT
    assert [reason for _, reason, _ in kube.events] == [REASON_UNFIT]
    assert not [o for (kind, _), o in kube.objects.items() if kind in ("Job", "ConfigMap")]
    before = copy.deepcopy(kube.calls)
    r.cache.informers["FineTuneJob"].replace([copy.deepcopy(kube.ftj)])
    r.reconcile("ns", "demo")  # the recheck: nothing new, nothing sent
    assert kube.calls == before
