"""The operator at scale: N FineTuneJobs against the test control plane, measured end to end.

    .venv/bin/python bench/operator_scale.py [--n 1000] [--json out/bench-operator.json] [--keep DIR]

What it does, in one run:
1. starts a control plane of its own (hack/controlplane/controlplane.sh start, binaries cached; KWOK
   plays the nodes and completes each pod 1.5 s after it runs), installs the CRD, namespaces
   `bench-op` (with the Hub-token Secret `hf-token`) and `bench-raw`;
2. creates the N FineTuneJobs at once (8 threads of the plain client; resources.gpusPerNode 0 so the
   CPU and GPU nodes all take them, storage.ephemeral so no claim has to bind);
3. starts the operator as a process (`python -m kubetune_operator`, --metrics-addr), and watches
   FineTuneJobs and Jobs itself, timestamping each transition as it arrives;
4. once every FineTuneJob is Succeeded: its requests and writes over their whole life, then 30 s at
   rest, its peak RSS (VmHWM) and CPU seconds (/proc/PID/stat);
5. the baseline: a plain client creates N Jobs of the same shape (a copy of one the operator made) with
   8 threads in `bench-raw`; the operator's Jobs/s divided by that rate is the ratio.

Where the numbers come from:
- requests: the operator's /metrics `kubetune_api_requests_total` (all series summed; watches
  excluded at rest when the series carry a `verb` label);
- writes: the same metric's create/update/patch/delete series when it has a `verb` label; otherwise
  the API server's audit log (DIR/audit.log: every write, with user and user agent), counting the
  admin user's writes that came neither from kubectl nor from this bench (which sends its own user
  agent), i.e. the operator's;
- time to all Jobs: from the operator process's start to the last of its Jobs seen by the bench's watch;
- status lag: per FineTuneJob, from its Job's Complete condition to its state Succeeded, both as seen
  by the bench's watches.

Goals (issue 10, 1,000 FineTuneJobs on 2 cores) are printed beside each number.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "hack" / "controlplane" / "controlplane.sh"
CRD = ROOT / "manifests" / "crd" / "kubetune.io_finetunejobs.yaml"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
LABEL_JOB = "kubetune.io/finetunejob"
OP_NS, RAW_NS = "bench-op", "bench-raw"
BENCH_AGENT = "kubetune-bench"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
THREADS = 8
REST_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

GOALS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "all_jobs_s": ("<= 20 s", lambda v: v <= 20),
    "ratio": (">= 0.7x", lambda v: v >= 0.7),
    "requests_per_ftj": ("<= 12", lambda v: v <= 12),
    "rest_writes": ("0", lambda v: v == 0),
    "rest_requests_per_s": ("<= 0.1/s", lambda v: v <= 0.1),
    "peak_rss_mb": ("<= 150 MB", lambda v: v <= 150),
    "lag_p99_s": ("<= 5 s", lambda v: v <= 5),
}


def log(msg: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def env() -> dict[str, str]:
    return {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spec() -> dict[str, Any]:
    return {
        "model": {"id": "tiiuae/falcon-7b"},
        "dataset": {"id": "timdettmers/openassistant-guanaco"},
        "resources": {"gpusPerNode": 0},
        "storage": {"ephemeral": True},
        "output": {"hub": {"repoId": "org/falcon-qlora", "token": {"secretKeyRef": {"name": "hf-token"}}}},
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# The control plane -----------------------------------------------------------------------------------


class ControlPlane:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.kubeconfig = directory / "kubeconfig"

    def start(self) -> None:
        proc = subprocess.run(
            ["bash", str(SCRIPT), "start", str(self.dir)],
            env={**env(), "CONTROLPLANE_OWNER_PID": str(os.getpid())},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            sys.exit(f"controlplane.sh start failed:\n{proc.stdout}{proc.stderr}")
        values = dict(
            line.split("=", 1) for line in (self.dir / "env").read_text().splitlines() if "=" in line
        )
        self.bin = Path(values["bin"])
        self.version = values["kubernetes"]

    def stop(self) -> None:
        subprocess.run(
            ["bash", str(SCRIPT), "stop", str(self.dir)], env=env(), capture_output=True, timeout=120
        )

    def kubectl(self, *args: str) -> str:
        return subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            env=env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout


def api_client(kubeconfig: Path, pool: int = THREADS + 4) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = pool
    api = client.ApiClient(cfg)
    api.user_agent = BENCH_AGENT  # told apart from the operator in the audit log
    return api


def create_all(create: Callable[[Any], Any], bodies: list[dict[str, Any]], threads: int = THREADS) -> float:
    """Create every body with `threads` threads; the seconds it took."""

    def one(body: dict[str, Any]) -> None:
        for attempt in range(5):
            try:
                create(body).drain_conn()
                return
            except client.ApiException as e:
                if e.status == 409:
                    return
                if e.status not in (429, 500, 503, 504) or attempt == 4:
                    raise
            time.sleep(0.5 * (attempt + 1))

    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, bodies))
    return time.monotonic() - start


# The bench's own watches: transitions timestamped as they arrive ---------------------------------------


class Watcher:
    """List+watch of one resource in one namespace, raw JSON lines (no model classes: the bench shares
    two cores with everything it measures), calling `seen(type, obj, t)` for every object."""

    def __init__(
        self, name: str, list_fn: Callable[..., Any], seen: Callable[[str, dict[str, Any], float], None]
    ):
        self.name = name
        self.list_fn = list_fn
        self.seen = seen
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)
        self.synced = threading.Event()

    def start(self) -> Watcher:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                resp = self.list_fn(_preload_content=False)
                listing = json.loads(resp.data)
                now = time.monotonic()
                for item in listing["items"]:
                    self.seen("LISTED", item, now)
                self.synced.set()
                rv = listing["metadata"]["resourceVersion"]
                while not self.stop.is_set():
                    resp = self.list_fn(
                        watch=True,
                        resource_version=rv,
                        allow_watch_bookmarks=True,
                        timeout_seconds=60,
                        _preload_content=False,
                        _request_timeout=(10, 90),
                    )
                    for line in resp:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            raise RuntimeError(str(event["object"].get("message")))
                        rv = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self.seen(event["type"], event["object"], time.monotonic())
                        if self.stop.is_set():
                            return
            except Exception as e:
                if not self.stop.is_set():
                    log(f"{self.name} watch: {str(e)[:200]}; relisting")
                    time.sleep(1)


class Observed:
    """What the bench's watches saw in the operator's namespace."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.job_added: dict[str, float] = {}
        self.job_complete: dict[str, float] = {}
        self.job_names: dict[str, set[str]] = {}
        self.succeeded: dict[str, float] = {}
        self.states: dict[str, str] = {}
        self.ftj_modified = 0  # FineTuneJob updates: nobody but the operator writes them after creation
        self.last_ftj_change = 0.0

    def job(self, type_: str, obj: dict[str, Any], t: float) -> None:
        owner = (obj["metadata"].get("labels") or {}).get(LABEL_JOB)
        if not owner or type_ == "DELETED":
            return
        conds = (obj.get("status") or {}).get("conditions") or []
        complete = any(c.get("type") == "Complete" and c.get("status") == "True" for c in conds)
        with self.lock:
            self.job_added.setdefault(owner, t)
            self.job_names.setdefault(owner, set()).add(obj["metadata"]["name"])
            if complete:
                self.job_complete.setdefault(owner, t)

    def ftj(self, type_: str, obj: dict[str, Any], t: float) -> None:
        name = obj["metadata"]["name"]
        state = (obj.get("status") or {}).get("state", "")
        with self.lock:
            if type_ == "MODIFIED":
                self.ftj_modified += 1
                self.last_ftj_change = t
            self.states[name] = state
            if state == "Succeeded":
                self.succeeded.setdefault(name, t)


# The operator process -----------------------------------------------------------------------------


class OperatorProcess:
    def __init__(self, kubeconfig: Path, log_path: Path, extra: list[str]) -> None:
        self.health, self.metrics_port = free_port(), free_port()
        self.log_path = log_path
        self.cmd = [
            sys.executable,
            "-m",
            "kubetune_operator",
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            OP_NS,
            "--health-addr",
            f"127.0.0.1:{self.health}",
            "--metrics-addr",
            f"127.0.0.1:{self.metrics_port}",
            "--log-format",
            "json",
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        with self.log_path.open("wb") as out:
            t = time.monotonic()
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env())
        return t

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """/metrics as {(name, labels): value}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
            if not m or line.startswith("#"):
                continue
            labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
        return out

    def requests(self) -> tuple[float, float | None, float, dict[str, float]]:
        """(all requests, writes or None when the metric has no verb label, watches, by verb/resource)."""
        total, writes, watches, labelled = 0.0, 0.0, 0.0, False
        by: dict[str, float] = {}
        for (name, labels), value in self.scrape().items():
            if name != "kubetune_api_requests_total":
                continue
            d = dict(labels)
            total += value
            if "verb" in d:
                labelled = True
                by[f"{d['verb']} {d.get('resource', '')}".strip()] = value
                writes += value if d["verb"] in WRITE_VERBS else 0.0
                watches += value if d["verb"] == "watch" else 0.0
        return total, writes if labelled else None, watches, by

    def usage(self) -> tuple[float, float]:
        """(peak RSS in MB, CPU seconds) of the process, from /proc."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / CLK_TCK  # utime, stime (fields 14 and 15)
        return hwm / 1024, cpu

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def audit_writes(path: Path, since: str, until: str | None = None) -> Counter[str]:
    """The operator's writes in the API server's audit log between two RFC 3339 times: the admin user's
    writes that came neither from kubectl nor from this bench, as "verb resource"."""
    out: Counter[str] = Counter()
    files = sorted(path.parent.glob(path.stem + "*" + path.suffix))
    for f in files:
        with f.open(errors="replace") as lines:
            for line in lines:
                with contextlib.suppress(ValueError, KeyError):
                    e = json.loads(line)
                    if e.get("stage") != "ResponseComplete" or e.get("verb") not in WRITE_VERBS:
                        continue
                    agent = e.get("userAgent", "")
                    if (
                        agent.startswith(("kubectl", BENCH_AGENT))
                        or e["user"]["username"] != "kubetune-admin"
                    ):
                        continue
                    ns = (e.get("objectRef") or {}).get("namespace")
                    t = e.get("requestReceivedTimestamp", "")
                    if ns != OP_NS or t < since or (until is not None and t > until):
                        continue
                    ref = e["objectRef"]
                    resource = ref.get("resource", "") + (
                        f"/{ref['subresource']}" if ref.get("subresource") else ""
                    )
                    out[f"{e['verb']} {resource}"] += 1
    return out


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1e6):06d}Z"


# The run ------------------------------------------------------------------------------------------


def wait(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def raw_job(template: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of one of the operator's Jobs, as a plain client would create it."""
    job = copy.deepcopy(template)
    meta = job["metadata"]
    job["metadata"] = {
        "name": name,
        "namespace": RAW_NS,
        "labels": {k: v for k, v in (meta.get("labels") or {}).items() if "controller-uid" not in k},
        "annotations": meta.get("annotations") or {},
    }
    job.pop("status", None)
    job["spec"].pop("selector", None)
    labels = job["spec"]["template"].get("metadata", {}).get("labels") or {}
    for k in [k for k in labels if "controller-uid" in k or k.endswith("job-name")]:
        del labels[k]
    return job


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.n
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    cp = ControlPlane(workdir / "cp")
    log(f"starting the control plane in {cp.dir}")
    cp.start()
    op: OperatorProcess | None = None
    watchers: list[Watcher] = []
    try:
        cp.kubectl("apply", "--server-side", "-f", str(CRD))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io")
        for ns in (OP_NS, RAW_NS):
            cp.kubectl("create", "namespace", ns)
        cp.kubectl(
            "create", "secret", "generic", "hf-token", "-n", OP_NS, "--from-literal=token=hf_bench0000"
        )
        for ns in (OP_NS, RAW_NS):  # pods need their namespace's default ServiceAccount
            wait(f"the ServiceAccount in {ns}", functools.partial(_sa, cp, ns), 60)

        api = api_client(cp.kubeconfig)
        custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
        seen = Observed()
        watch_api = api_client(cp.kubeconfig, pool=4)
        w_batch, w_custom = client.BatchV1Api(watch_api), client.CustomObjectsApi(watch_api)
        watchers = [
            Watcher("Job", lambda **kw: w_batch.list_namespaced_job(OP_NS, **kw), seen.job).start(),
            Watcher(
                "FineTuneJob",
                lambda **kw: w_custom.list_namespaced_custom_object(GROUP, VERSION, OP_NS, PLURAL, **kw),
                seen.ftj,
            ).start(),
        ]
        for w in watchers:
            w.synced.wait(30)

        names = [f"ftj-{i:04d}" for i in range(n)]
        bodies = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": OP_NS},
                "spec": spec(),
            }
            for name in names
        ]
        ftj_s = create_all(
            lambda b: custom.create_namespaced_custom_object(
                GROUP, VERSION, OP_NS, PLURAL, b, _preload_content=False
            ),
            bodies,
        )
        log(f"{n} FineTuneJobs created in {ftj_s:.1f} s ({n / ftj_s:.0f}/s); starting the operator")

        op = OperatorProcess(cp.kubeconfig, workdir / "operator.log", args.operator_arg)
        since = utc_now()
        t0 = op.start()
        wait(f"{n} Jobs", lambda: len(seen.job_added) >= n, args.timeout, 0.2)
        all_jobs_s = max(seen.job_added.values()) - t0
        first_job_s = min(seen.job_added.values()) - t0  # the process's start-up and first list
        log(f"{n} Jobs after {all_jobs_s:.1f} s; waiting for every FineTuneJob to succeed")
        wait(f"{n} FineTuneJobs Succeeded", lambda: len(seen.succeeded) >= n, args.timeout, 1.0)
        done_s = max(seen.succeeded.values()) - t0
        # Life until Succeeded: its last writes (the Succeeded patch and event) have landed by now.
        time.sleep(2)
        life_total, life_writes, _, life_by = op.requests()
        until = utc_now()
        audit = cp.dir / "audit.log"
        life_audit = audit_writes(audit, since, until) if audit.exists() else Counter()
        if life_writes is None:
            life_writes = float(sum(life_audit.values())) if audit.exists() else float("nan")
        writes_source = "metrics" if life_by else ("audit log" if audit.exists() else "none")
        rss_life, cpu_life = op.usage()
        log(f"all Succeeded after {done_s:.1f} s; {REST_S:.0f} s at rest")

        # At rest.
        time.sleep(3)
        r0_total, r0_writes, r0_watches, _ = op.requests()
        rest_since, modified0 = utc_now(), seen.ftj_modified
        time.sleep(REST_S)
        r1_total, r1_writes, r1_watches, _ = op.requests()
        rest_audit = audit_writes(audit, rest_since) if audit.exists() else Counter()
        rest_requests = (r1_total - r0_total) - (r1_watches - r0_watches)
        if r1_writes is not None and r0_writes is not None:
            rest_writes = r1_writes - r0_writes
        else:
            rest_writes = float(sum(rest_audit.values()))
        rest_writes = max(rest_writes, float(seen.ftj_modified - modified0))
        peak_rss, cpu = op.usage()
        op.stop()
        for w in watchers:
            w.stop.set()

        lags = [
            seen.succeeded[k] - seen.job_complete[k]
            for k in names
            if k in seen.job_complete and k in seen.succeeded
        ]
        duplicates = {k: sorted(v) for k, v in seen.job_names.items() if len(v) > 1}

        # The baseline: the same number of Jobs of the same shape, from a plain client with 8 threads.
        template = json.loads(batch.list_namespaced_job(OP_NS, limit=1, _preload_content=False).data)[
            "items"
        ][0]
        raw = [raw_job(template, f"raw-{i:04d}") for i in range(n)]
        raw_s = create_all(lambda b: batch.create_namespaced_job(RAW_NS, b, _preload_content=False), raw)
        log(f"raw client: {n} Jobs in {raw_s:.1f} s ({n / raw_s:.0f}/s)")

        op_rate, raw_rate = n / all_jobs_s, n / raw_s
        return {
            "n": n,
            "machine": f"{os.cpu_count()} cores, {_mem_gib():.0f} GiB, {platform.machine()}, "
            f"Python {platform.python_version()}",
            "kubernetes": cp.version,
            "operator_args": args.operator_arg,
            "ftj_create_s": round(ftj_s, 2),
            "all_jobs_s": round(all_jobs_s, 2),
            "first_job_s": round(first_job_s, 2),
            "all_succeeded_s": round(done_s, 2),
            "operator_jobs_per_s": round(op_rate, 1),
            "raw_jobs_s": round(raw_s, 2),
            "raw_jobs_per_s": round(raw_rate, 1),
            "ratio": round(op_rate / raw_rate, 3),
            "requests_total": life_total,
            "requests_per_ftj": round(life_total / n, 2),
            "writes_total": life_writes,
            "writes_per_ftj": round(life_writes / n, 2),
            "writes_source": writes_source,
            "requests_by_verb_resource": life_by,
            "writes_by_verb_resource_audit": dict(life_audit),
            "ftj_status_updates_seen": seen.ftj_modified,
            "rest_seconds": REST_S,
            "rest_requests_per_s": round(rest_requests / REST_S, 3),
            "rest_writes": rest_writes,
            "peak_rss_mb": round(peak_rss, 1),
            "peak_rss_mb_until_succeeded": round(rss_life, 1),
            "cpu_s": round(cpu, 2),
            "cpu_s_until_succeeded": round(cpu_life, 2),
            "lag_p50_s": round(percentile(lags, 0.5), 3),
            "lag_p99_s": round(percentile(lags, 0.99), 3),
            "lag_max_s": round(max(lags, default=float("nan")), 3),
            "lag_samples": len(lags),
            "duplicate_jobs": duplicates,
        }
    finally:
        if op is not None:
            op.stop()
        for w in watchers:
            w.stop.set()
        if args.keep:
            log(f"kept: {workdir} (stop: {SCRIPT} stop {cp.dir})")
        else:
            cp.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def _sa(cp: ControlPlane, ns: str) -> bool:
    with contextlib.suppress(subprocess.CalledProcessError):
        return bool(cp.kubectl("get", "serviceaccount", "default", "-n", ns, "-o", "name"))
    return False


def _mem_gib() -> float:
    with contextlib.suppress(OSError, AttributeError, StopIteration):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def table(result: dict[str, Any]) -> Iterator[str]:
    rows = [
        (
            "all Jobs created",
            f"{result['all_jobs_s']:.1f} s ({result['operator_jobs_per_s']:.0f}/s)",
            "all_jobs_s",
        ),
        ("  first Job after", f"{result['first_job_s']:.1f} s (start-up, first list)", None),
        ("raw client, 8 threads", f"{result['raw_jobs_s']:.1f} s ({result['raw_jobs_per_s']:.0f}/s)", None),
        ("operator / raw rate", f"{result['ratio']:.2f}x", "ratio"),
        ("all Succeeded", f"{result['all_succeeded_s']:.1f} s", None),
        ("requests per FTJ", f"{result['requests_per_ftj']:.1f}", "requests_per_ftj"),
        ("writes per FTJ", f"{result['writes_per_ftj']:.1f} ({result['writes_source']})", None),
        ("at rest: requests/s", f"{result['rest_requests_per_s']:.2f}", "rest_requests_per_s"),
        ("at rest: writes", f"{result['rest_writes']:.0f} in {result['rest_seconds']:.0f} s", "rest_writes"),
        ("peak RSS", f"{result['peak_rss_mb']:.0f} MB", "peak_rss_mb"),
        ("CPU", f"{result['cpu_s']:.1f} s ({result['cpu_s_until_succeeded']:.1f} s until Succeeded)", None),
        ("status lag p50", f"{result['lag_p50_s']:.2f} s", None),
        ("status lag p99", f"{result['lag_p99_s']:.2f} s (max {result['lag_max_s']:.2f})", "lag_p99_s"),
        ("duplicate Jobs", str(len(result["duplicate_jobs"])), None),
    ]
    yield f"kubetune operator bench: {result['n']} FineTuneJobs, {result['machine']}, {result['kubernetes']}"
    yield f"{'':24} {'measured':34} {'goal':10} ok"
    for label, value, key in rows:
        goal, ok = "", ""
        if key is not None:
            text, check = GOALS[key]
            goal, ok = text, "yes" if check(result[key]) else "NO"
        yield f"{label:24} {value:34} {goal:10} {ok}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="FineTuneJobs to create (default 1000)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for each phase")
    parser.add_argument(
        "--keep", default=None, metavar="DIR", help="work in DIR and leave the control plane running"
    )
    parser.add_argument(
        "--operator-arg",
        action="append",
        default=[],
        help="an extra flag for the operator, repeatable (e.g. --operator-arg=--workers=8)",
    )
    args = parser.parse_args()
    result = run(args)
    for line in table(result):
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
