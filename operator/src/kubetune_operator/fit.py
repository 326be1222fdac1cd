"""Whether a run fits the memory of its GPU, decided before its Job is created (reason `Unfit`).

Two inputs, both read off the hot path of a pass and memoized:

- **GPU memory per GPU**: the `nvidia.com/gpu.memory` label (MiB, set by NVIDIA GPU feature discovery)
  of the nodes the run's pods may land on: `nvidia.com/gpu.product=<resources.gpuType>` and
  `resources.nodeSelector`, asked of the API server as a label selector, metadata only
  (PartialObjectMetadataList: labels, never a node's status), memoized per selector for NODES_TTL_SECONDS.
  The largest GPU among them counts: a run is refused only when it fits on none. No node says, and
  `gpuType` is in kubetune.plan's table: the table's figure. Neither: not checked.
- **The model's shape**: `config.json` of `model.id` at `model.revision`, fetched from the Hub with the
  operator's own access (its environment: `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`; never the
  FineTuneJob's token, which the operator does not read). Fetched in a small thread pool, memoized per
  (id, revision) for SHAPE_TTL_SECONDS (a failure for FAILURE_TTL_SECONDS, then tried again): a pass that
  finds it not fetched yet asks to be run again, and the fetch's end wakes it (`on_ready`). One slow Hub
  holds no worker, and a run waits at most WAIT_SECONDS for it: then it starts, not checked. `model.path`
  (a folder in the trainer's workspace) cannot be read here: not checked.

The decision (`decide`) is a pure function of the spec, the shape and the GPU memory: kubetune.plan's
estimate against the memory. A failed fetch, an unknown architecture, a planner error: never `Unfit`,
only "not checked", said once in the run's `RunCreated` event. A run whose Job exists is never checked
(nothing running is ever stopped by this).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from kubernetes.client.rest import ApiException

from kubetune import plan as planner
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.redact import redact
from kubetune.render import GPU_PRODUCT_LABEL
from kubetune_operator.kube import Kube, describe_error

log = logging.getLogger("kubetune.operator")

Key = tuple[str, str]

# Set by GPU feature discovery on every GPU node: the memory of one GPU, in MiB.
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
MIB = 1024 * 1024
# A list of PartialObjectMetadata: labels without a node's spec and status (which carry most of its bytes).
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
NODES_PAGE = 500
# How long a node listing is trusted: a relabelled node is seen this late (the Unfit recheck below).
NODES_TTL_SECONDS = 60.0
# config.json of a branch (`main`) may change; a failed fetch (the Hub unreachable, a model it does not
# know) is tried again after FAILURE_TTL_SECONDS, and until then runs of that model start unchecked.
SHAPE_TTL_SECONDS = 3600.0
FAILURE_TTL_SECONDS = 300.0
# The Hub's answer, per request, and how long a new run waits for it before it starts unchecked (the
# Hub answers config.json in well under a second; one it cannot reach costs huggingface_hub's retries,
# about 20 s, which no run waits for: the fetch goes on, and its verdict serves the runs after).
HUB_TIMEOUT_SECONDS = 10.0
WAIT_SECONDS = 5.0
# Fetches at once: distinct models are few, and each waits on the network, not the CPU.
FETCH_THREADS = 2
# Memoized shapes kept at most (the oldest go first).
SHAPES_MAX = 1024

Verdict = Literal["fits", "unfit", "unchecked", "waiting"]


@dataclass(frozen=True)
class Fit:
    """What the check says of one run: it fits (`message`: the estimate against the memory), it cannot
    fit (`message`: kubetune.plan.unfit_message), it was not checked (`message`: why), or the model's
    config.json is on its way (look again after `retry` seconds at the latest)."""

    verdict: Verdict
    message: str
    retry: float | None = None


@dataclass(frozen=True)
class GpuMemory:
    bytes: int  # of one GPU
    source: str  # where the figure comes from, for the message
    product: str | None  # the nvidia.com/gpu.product value, when known


# --------------------------------------------------------------------------------------------------
# Pure: the selector, the memory, the decision
# --------------------------------------------------------------------------------------------------


def node_selector(job: FineTuneJob) -> str:
    """The label selector of the GPU nodes the run's pods may land on that say their GPU memory."""
    res = job.spec.resources
    terms = dict(res.node_selector)
    if res.gpu_type:
        terms[GPU_PRODUCT_LABEL] = res.gpu_type
    return ",".join([*(f"{k}={v}" for k, v in sorted(terms.items())), GPU_MEMORY_LABEL])


def gpu_memory(job: FineTuneJob, nodes: list[dict[str, str]] | None) -> GpuMemory | None:
    """The memory of one GPU the run may get: the largest `nvidia.com/gpu.memory` among `nodes` (the
    labels of the matching nodes; None: they could not be listed), else the gpuType table's, else None."""
    gpu_type = job.spec.resources.gpu_type
    best: tuple[int, str, dict[str, str]] | None = None
    for labels in nodes or []:
        try:
            mib = int(str(labels.get(GPU_MEMORY_LABEL, "")).strip())
        except ValueError:
            continue
        if mib > 0 and (best is None or mib > best[0]):
            best = (mib, labels.get("kubernetes.io/hostname", ""), labels)
    if best is not None:
        mib, _, labels = best
        count = len(nodes or [])
        where = f"{count} matching node{'s' if count != 1 else ''}"
        return GpuMemory(
            mib * MIB,
            f"node label {GPU_MEMORY_LABEL}={mib} ({where})",
            gpu_type or labels.get(GPU_PRODUCT_LABEL),
        )
    if gpu_type:
        info = planner.gpu_info(gpu_type)
        if info is not None:
            return GpuMemory(info.memory_bytes, f"gpuType table ({gpu_type})", gpu_type)
    return None


def unknown_memory_message(job: FineTuneJob) -> str:
    res = job.spec.resources
    if res.gpu_type:
        return (
            f"GPU memory not checked: no node with {GPU_PRODUCT_LABEL}={res.gpu_type} carries the label "
            f"{GPU_MEMORY_LABEL}, and kubetune's GPU table does not know {res.gpu_type}"
        )
    return (
        f"GPU memory not checked: resources.gpuType is not set and no matching node carries the label "
        f"{GPU_MEMORY_LABEL}"
    )


def decide(job: FineTuneJob, shape: planner.ModelShape, gpu: GpuMemory) -> Fit:
    """The planner's estimate for `job` against the memory of one GPU."""
    table = planner.gpu_info(gpu.product) if gpu.product else None
    # The table's peak (for the time per step), the memory the nodes say.
    info = (
        replace(table, memory_bytes=gpu.bytes)
        if table is not None
        else planner.GpuInfo(gpu.product or "unknown", gpu.bytes, None)
    )
    est = planner.estimate(job.spec, shape, info)
    if not est.fits(gpu.bytes):
        return Fit("unfit", planner.unfit_message(est, gpu.bytes, gpu.source))
    return Fit(
        "fits",
        f"GPU memory checked: the planner estimates {planner.fmt_bytes(est.total_bytes)} per GPU of "
        f"{planner.fmt_bytes(gpu.bytes)} ({gpu.source})",
    )


# --------------------------------------------------------------------------------------------------
# The reads, memoized
# --------------------------------------------------------------------------------------------------


@dataclass
class _Fetch:
    """One (id, revision): in flight, or its shape, or why it could not be had."""

    started: float
    done: bool = False
    shape: planner.ModelShape | None = None
    error: str | None = None
    expires: float = 0.0
    waiting: set[Key] = field(default_factory=set)


def hub_shape(repo: str, revision: str, timeout: float) -> planner.ModelShape:
    """config.json of `repo` at `revision`, with the operator's own Hub access, as a ModelShape."""
    return planner.shape_from_config(planner.hub_config(repo, revision, timeout=timeout))


class FitChecker:
    """Fit checks for runs about to be created (see the module docstring). `on_ready(keys)` is called
    from a fetch thread with the FineTuneJobs that waited for it: enqueue them."""

    def __init__(
        self,
        kube: Kube | None,
        *,
        on_ready: Callable[[Iterable[Key]], None] | None = None,
        fetch: Callable[[str, str], planner.ModelShape] | None = None,
        list_nodes: Callable[[str], list[dict[str, str]]] | None = None,
        hub_timeout: float = HUB_TIMEOUT_SECONDS,
        wait: float = WAIT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.on_ready = on_ready
        self.hub_timeout = hub_timeout
        self.wait = wait
        self.clock = clock
        self._fetch = fetch or (lambda repo, revision: hub_shape(repo, revision, self.hub_timeout))
        self._list_nodes = list_nodes or self._list_node_labels
        self._lock = threading.Lock()
        self._nodes: dict[str, tuple[float, list[dict[str, str]] | None]] = {}
        self._node_locks: dict[str, threading.Lock] = {}
        self._shapes: dict[tuple[str, str], _Fetch] = {}
        # Daemon threads, FETCH_THREADS at a time: a fetch the Hub never answers (huggingface_hub retries
        # an unreachable endpoint for about 20 s) never holds up a stopping operator.
        self._slots = threading.Semaphore(FETCH_THREADS)
        self._stopped = threading.Event()
        self._warned_nodes = False

    def stop(self) -> None:
        self._stopped.set()

    def check(self, key: Key, job: FineTuneJob) -> Fit | None:
        """The verdict for `job`'s run; None when there is nothing to check (no GPU)."""
        if job.spec.resources.gpus_per_node == 0:
            return None
        gpu = gpu_memory(job, self.nodes(node_selector(job)))
        if gpu is None:
            return Fit("unchecked", unknown_memory_message(job))
        model = job.spec.model
        if model.id is None:
            return Fit(
                "unchecked",
                "GPU memory not checked: model.path is a folder in the trainer's workspace, which the "
                "operator does not read",
            )
        shape = self.shape(key, model.id, model.revision)
        if isinstance(shape, Fit):
            return shape
        try:
            return decide(job, shape, gpu)
        except Exception as e:  # the planner's bug must never stop a run
            log.warning("fit check failed: %s", describe_error(e), extra=_ctx(key))
            return Fit("unchecked", f"GPU memory not checked: the planner failed ({describe_error(e)})")

    # Nodes --------------------------------------------------------------------------------------------

    def nodes(self, selector: str) -> list[dict[str, str]] | None:
        """The labels of the nodes matching `selector`, at most NODES_TTL_SECONDS old; None when they
        cannot be listed. One listing per selector at a time: the others wait for it."""
        with self._lock:
            hit = self._nodes.get(selector)
            if hit is not None and hit[0] > self.clock():
                return hit[1]
            lock = self._node_locks.setdefault(selector, threading.Lock())
        with lock:
            with self._lock:
                hit = self._nodes.get(selector)
                if hit is not None and hit[0] > self.clock():
                    return hit[1]
            labels: list[dict[str, str]] | None
            try:
                labels = self._list_nodes(selector)
            except Exception as e:
                labels = None
                if not self._warned_nodes or not (isinstance(e, ApiException) and e.status == 403):
                    log.warning(
                        "cannot list GPU nodes (%s): GPU memory comes from the gpuType table only",
                        describe_error(e),
                    )
                self._warned_nodes = True
            with self._lock:
                if len(self._nodes) > 1024:
                    self._nodes.clear()
                self._nodes[selector] = (self.clock() + NODES_TTL_SECONDS, labels)
            return labels

    def _list_node_labels(self, selector: str) -> list[dict[str, str]]:
        """One metadata-only listing of the nodes matching `selector`, in pages."""
        assert self.kube is not None
        out: list[dict[str, str]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": selector, "limit": NODES_PAGE}
            if token:
                kwargs["_continue"] = token
            resp = self.kube.core.list_node(
                _headers={"Accept": METADATA_LIST}, _preload_content=False, **kwargs
            )
            body = json.loads(resp.data)
            out += [dict((i.get("metadata") or {}).get("labels") or {}) for i in body.get("items") or []]
            token = (body.get("metadata") or {}).get("continue") or None
            if not token:
                return out

    # Model shapes -------------------------------------------------------------------------------------

    def shape(self, key: Key, repo: str, revision: str) -> planner.ModelShape | Fit:
        """The shape of `repo` at `revision`, or the Fit to report while it is fetched or when it cannot
        be: waiting (the fetch's end enqueues `key`), or unchecked."""
        now = self.clock()
        with self._lock:
            entry = self._shapes.get((repo, revision))
            if entry is None or (entry.done and entry.expires <= now):
                entry = _Fetch(started=now)
                self._shapes.pop((repo, revision), None)
                self._shapes[(repo, revision)] = entry
                while len(self._shapes) > SHAPES_MAX:
                    del self._shapes[next(iter(self._shapes))]
                threading.Thread(
                    target=self._run_fetch, args=(repo, revision, entry), name="hub-config", daemon=True
                ).start()
            if not entry.done:
                waited = now - entry.started
                if waited >= self.wait:
                    return Fit(
                        "unchecked",
                        f"GPU memory not checked: config.json of {repo} (revision {revision}) did not "
                        f"arrive from the Hub within {self.wait:.0f} s",
                    )
                entry.waiting.add(key)
                return Fit("waiting", f"reading config.json of {repo}", retry=self.wait - waited)
            if entry.shape is None:
                return Fit(
                    "unchecked",
                    f"GPU memory not checked: cannot read config.json of {repo} (revision {revision}): "
                    f"{entry.error}",
                )
            return entry.shape

    def _run_fetch(self, repo: str, revision: str, entry: _Fetch) -> None:
        shape: planner.ModelShape | None = None
        error: str | None = None
        try:
            with self._slots:
                shape = self._fetch(repo, revision)
        except planner.PlanError as e:  # its message names the fix
            error = redact(str(e).strip().splitlines()[0][:300]) if str(e).strip() else type(e).__name__
        except Exception as e:
            error = describe_error(e)
        if error is not None:
            log.info("no model shape for %s (revision %s): %s; not checked", repo, revision, error)
        with self._lock:
            entry.shape, entry.error, entry.done = shape, error, True
            entry.expires = self.clock() + (SHAPE_TTL_SECONDS if shape is not None else FAILURE_TTL_SECONDS)
            waiting, entry.waiting = entry.waiting, set()
        if waiting and self.on_ready is not None and not self._stopped.is_set():
            self.on_ready(waiting)


def _ctx(key: Key) -> dict[str, str]:
    return {"namespace": key[0], "ftj": key[1]}
