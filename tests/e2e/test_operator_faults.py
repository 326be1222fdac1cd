"""Faults the operator must survive, run as a process against the real control plane.

Each test starts `python -m kubetune_operator` (whatever the operator is today), breaks something in
the middle of its work, and then asks for the same two things: every FineTuneJob ends Succeeded with
nobody restarting the operator by hand (a liveness probe that fails counts as a restart by the kubelet,
which the test plays), and no FineTuneJob ever has more than one Job.

- SIGKILL mid-burst, then a new process;
- kube-apiserver restarted mid-burst (`controlplane.sh restart-apiserver`: same flags, port, certs);
- a watch that expires (410 Gone), see `test_a_watch_that_expires_is_relisted`;
- connections that go silent without closing (tests/e2e/relay.py black-holes them): the operator
  recovers by itself once the network is back, or its /healthz fails so that the kubelet restarts it.

Pods are KWOK's (they Succeed 1.5 s after they run); workspaces are emptyDirs (storage.ephemeral), so
no claim has to bind. Leader-election faults are in test_operator_leader*.py.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from controlplane import ControlPlane, poll
from kubernetes import client, config
from relay import Relay
from test_operator import spec as base_spec  # one FineTuneJob spec shape for the e2e tests

from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION
from kubetune.contract import LABEL_JOB, MANAGED_BY

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
FAKE_TOKEN = "hf_" + "E2eFaultsNeverLeak0123456789abcd"
BURST = 50
# Generous: two cores, shared with other test sessions' control planes.
SETTLE_S = 180.0


def spec() -> dict[str, Any]:
    """test_operator's spec on KWOK's nodes, with no claim to bind (many at once)."""
    return base_spec(resources={"gpusPerNode": 0}, storage={"ephemeral": True})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The operator under test; KUBETUNE_E2E_OPERATOR overrides it (a command line), e.g. to run these tests
# against an older operator: "python -m kubetune.cli operator" with PYTHONPATH at its source.
OPERATOR_CMD = shlex.split(os.environ.get("KUBETUNE_E2E_OPERATOR", "")) or [
    sys.executable,
    "-m",
    "kubetune_operator",
]


def operator_flags() -> set[str]:
    """The flags this operator has (`--help`): new ones (e.g. --watch-stall-seconds) are used when there."""
    out = subprocess.run(
        [*OPERATOR_CMD, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", out))


class OperatorProcess:
    """`python -m kubetune_operator` for one namespace, logging JSON to a file (a pipe nobody reads
    would fill and block it), with /healthz on a port of its own."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, extra: Iterable[str] = ()) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log
        self.extra = list(extra)
        self.health = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> OperatorProcess:
        self.starts += 1
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    *OPERATOR_CMD,
                    "--kubeconfig",
                    str(self.kubeconfig),
                    "--namespace",
                    self.namespace,
                    "--health-addr",
                    f"127.0.0.1:{self.health}",
                    "--log-format",
                    "json",
                    *self.extra,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"},
            )
        poll(lambda: self.probe("/readyz") == 200, timeout=60, what="the operator's /readyz")
        return self

    def probe(self, path: str = "/healthz") -> int:
        """The HTTP status of a probe, 0 when it does not answer within 3 s (a kubelet counts both)."""
        assert self.proc is not None and self.proc.poll() is None, f"the operator exited:\n{self.tail()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}{path}", timeout=3) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


class Api:
    """The test's own plain client (cluster admin), for bursts and checks: kubectl per call would be
    too slow to catch an operator mid-burst."""

    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self.ns = namespace
        self.audit = cp.dir / "audit.log"  # every write, when the control plane keeps an audit log
        api_client = config.new_client_from_config(config_file=str(cp.kubeconfig))
        self.custom = client.CustomObjectsApi(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    def create(self, names: list[str], threads: int = 4) -> None:
        def one(name: str) -> None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": spec(),
            }
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, names))

    def states(self) -> dict[str, str]:
        items = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL)["items"]
        return {i["metadata"]["name"]: (i.get("status") or {}).get("state", "") for i in items}

    def jobs_by_owner(self) -> Counter[str]:
        resp = self.batch.list_namespaced_job(self.ns, label_selector=MANAGED_BY, _preload_content=False)
        return Counter(j["metadata"]["labels"].get(LABEL_JOB, "") for j in json.loads(resp.data)["items"])

    def wait_jobs(self, at_least: int, timeout: float = 120) -> int:
        return poll(
            lambda: (n := sum(self.jobs_by_owner().values())) >= at_least and n,
            timeout=timeout,
            what=f"{at_least} Jobs",
            interval=0.1,
        )

    def wait_succeeded(self, names: Iterable[str], op: OperatorProcess, timeout: float = SETTLE_S) -> None:
        want = set(names)

        def done() -> bool:
            states = self.states()
            missing = {n: states.get(n) for n in want if states.get(n) != "Succeeded"}
            assert not missing, f"{len(missing)} not Succeeded, e.g. {dict(list(missing.items())[:5])}"
            return True

        try:
            poll(done, timeout=timeout, what=f"{len(want)} FineTuneJobs to succeed", interval=1.0)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n--- operator log:\n{op.tail()}") from None

    def jobs_created(self) -> Counter[str]:
        """Jobs created in the namespace (201), by name, from the API server's audit log: a duplicate
        that was created and deleted again shows here even when the end state looks right."""
        created: Counter[str] = Counter()
        for f in sorted(self.audit.parent.glob("audit*.log")):
            for line in f.read_text(errors="replace").splitlines():
                if '"jobs"' not in line or self.ns not in line:
                    continue
                with contextlib.suppress(ValueError, KeyError):
                    e = json.loads(line)
                    ref = e.get("objectRef") or {}
                    if (
                        e.get("stage") == "ResponseComplete"
                        and e.get("verb") == "create"
                        and ref.get("resource") == "jobs"
                        and ref.get("namespace") == self.ns
                        and (e.get("responseStatus") or {}).get("code") in (200, 201)
                    ):
                        created[ref.get("name", "")] += 1
        return created

    def assert_one_job_each(self, names: Iterable[str]) -> None:
        jobs = self.jobs_by_owner()
        want = set(names)
        assert {n: c for n, c in jobs.items() if c != 1} == {}, "a FineTuneJob got more than one Job"
        assert set(jobs) == want, f"Jobs without their FineTuneJob or missing: {set(jobs) ^ want}"
        if self.audit.exists():
            created = self.jobs_created()
            assert sum(created.values()) == len(want), f"{sum(created.values())} Jobs created for {len(want)}"


@pytest.fixture
def api(control_plane: ControlPlane, namespace: str, crd: None) -> Api:
    control_plane.kubectl(
        "create",
        "secret",
        "generic",
        "hf-token",
        "-n",
        namespace,
        f"--from-literal=token={FAKE_TOKEN}",
        check=True,
    )
    return Api(control_plane, namespace)


@pytest.fixture
def operator(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """Not started: a test starts it (through a relay, or with flags of its own) when it is ready."""
    op = OperatorProcess(control_plane.kubeconfig, namespace, tmp_path / "operator.log")
    yield op
    op.stop()
    assert FAKE_TOKEN not in op.text()


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(n)]


def assert_no_restart_by_hand(op: OperatorProcess, starts: int = 1) -> None:
    assert op.starts == starts and op.proc is not None and op.proc.poll() is None, op.tail()
    assert op.probe("/healthz") == 200


# ---------------------------------------------------------------------------------------------------


def test_sigkill_mid_burst_then_a_new_process_creates_no_duplicate(
    api: Api, operator: OperatorProcess
) -> None:
    burst = names("kill", BURST)
    operator.start()
    creating = threading.Thread(target=api.create, args=(burst,), daemon=True)
    creating.start()
    at_kill = api.wait_jobs(5)
    operator.kill()  # SIGKILL: no shutdown, whatever was in flight is lost
    creating.join(timeout=60)
    print(f"[faults] SIGKILL with {at_kill} of {BURST} Jobs created")
    operator.start()
    api.wait_succeeded(burst, operator)
    api.assert_one_job_each(burst)
    assert_no_restart_by_hand(operator, starts=2)


def test_apiserver_restart_mid_burst(
    control_plane: ControlPlane, api: Api, operator: OperatorProcess
) -> None:
    burst = names("apirestart", BURST)
    operator.start()
    creating = threading.Thread(target=api.create, args=(burst[: BURST // 2],), daemon=True)
    creating.start()
    at_restart = api.wait_jobs(5)
    creating.join(timeout=60)
    control_plane.restart_apiserver()  # SIGTERM, ~1-10 s down, then the same flags, port and certs
    api.create(burst[BURST // 2 :])  # the second half only exists on the new API server
    print(f"[faults] kube-apiserver restarted with {at_restart} of {BURST} Jobs created")
    api.wait_succeeded(burst, operator)
    api.assert_one_job_each(burst)
    assert_no_restart_by_hand(operator)


# What an operator logs when it relists after 410 Gone (today: "<Kind> watch expired (410 Gone);
# relisting"); any of these words will do, in case the wording changes.
EXPIRED = re.compile(r"\b410\b|expired|too old", re.IGNORECASE)


def test_a_watch_that_expires_is_relisted(
    control_plane: ControlPlane, api: Api, operator: OperatorProcess
) -> None:
    """410 Gone, for sure: while the operator is SIGSTOPped (its watches open, their resourceVersions
    frozen), FineTuneJobs are created and the API server restarts. Its new watch cache starts at
    etcd's current revision, later than every resourceVersion the operator holds, exactly as when the
    cache's window has moved past a slow watcher; the knobs that would shrink the window
    (--watch-cache-sizes, --default-watch-cache-size) do not apply to CRDs in 1.37, and a
    compaction alone does not reach the watch cache. The operator resumes (SIGCONT), re-watches from
    its old resourceVersion, is told 410, and must relist: its log says so, and the FineTuneJobs made
    while it was stopped are served."""
    first = names("before", 5)
    operator.start()
    api.create(first)
    api.wait_succeeded(first, operator)
    operator.send(signal.SIGSTOP)
    try:
        later = names("paused", 10)
        api.create(later)
        control_plane.restart_apiserver()
        # Something to see on the new API server: these exist only after its cache started.
        api.create(names("after", 5))
    finally:
        operator.send(signal.SIGCONT)
    everything = first + later + names("after", 5)
    api.wait_succeeded(everything, operator)
    api.assert_one_job_each(everything)
    assert_no_restart_by_hand(operator)
    relisted = [r["msg"] for r in operator.records() if EXPIRED.search(str(r.get("msg", "")))]
    watch_lines = "\n".join(str(r.get("msg")) for r in operator.records() if "watch" in str(r.get("msg")))
    assert relisted, f"no 410 / relist in the operator's log; what it said of its watches:\n{watch_lines}"
    print(f"[faults] after the expiry the operator said: {relisted[0]!r}")


# Silent connections ---------------------------------------------------------------------------------


# The API server sends each watch a BOOKMARK about once a minute: a stall threshold above that never
# fails a quiet but healthy operator.
STALL_S = 70


def stall_seconds(flags: set[str]) -> tuple[list[str], float]:
    """Flags that shorten the operator's stall detection (when it has them), and how long a black hole
    must last to be longer than that, or than its watch read timeout.

    --watch-stall-seconds is set to STALL_S when the operator has that flag; otherwise the client's
    read timeouts in kube.py (READ_TIMEOUT, WATCH_READ_TIMEOUT, ...) are the bound. An operator with
    neither (the one before issue 10) has no read timeout at all: 30 s then."""
    if "--watch-stall-seconds" in flags:
        extra, bound = ["--watch-stall-seconds", str(STALL_S)], float(STALL_S)
    elif os.environ.get("KUBETUNE_E2E_OPERATOR"):
        extra, bound = [], 10.0  # another operator: this checkout's constants are not its own
    else:
        kube = importlib.import_module("kubetune_operator.kube")
        pattern = re.compile(r"READ_TIMEOUT|STALL_SECONDS")
        timeouts = [
            float(v)
            for k, v in vars(kube).items()
            if pattern.search(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        extra, bound = [], max(timeouts, default=10.0)
    # Longer than the bound, with room for a probe and a retry; at most 2 minutes of test time.
    return extra, min(bound + 20.0, 120.0)


RECOVER_S = 60.0  # after the network is back: time to serve a new FineTuneJob


def test_silent_connections_recover_or_fail_the_liveness_probe(
    control_plane: ControlPlane, api: Api, operator: OperatorProcess, tmp_path: Path
) -> None:
    """Every connection of the operator goes silent without closing (tests/e2e/relay.py): it must
    either fail /healthz (so the kubelet restarts it) while the black hole lasts longer than its read
    timeout, or, once new connections go through again, serve new FineTuneJobs by itself. Frozen with
    /healthz 200 is the one wrong answer."""
    extra, hole_s = stall_seconds(operator_flags())
    with Relay(("127.0.0.1", control_plane.port)) as relay:
        operator.kubeconfig = control_plane.kubeconfig_via(relay.url, tmp_path / "via-relay.kubeconfig")
        operator.extra = extra
        operator.start()
        api.create(["steady"])
        api.wait_succeeded(["steady"], operator)
        assert operator.probe("/healthz") == 200, f"unhealthy before any fault\n{operator.tail()}"
        held = relay.blackhole()
        assert held > 0, "the operator holds no connection through the relay"
        api.create(["in-the-dark"])  # made while its connections are silent (straight to the API server)
        t0 = time.monotonic()
        outcome, when = "", 0.0
        while not outcome and time.monotonic() - t0 < hole_s:
            if operator.probe("/healthz") != 200:
                outcome, when = "unhealthy", time.monotonic() - t0
            time.sleep(1)
        relay.forward()  # new connections go through; the silenced ones never come back
        api.create(["after-dark"])
        t1 = time.monotonic()
        while not outcome and time.monotonic() - t1 < RECOVER_S:
            jobs = api.jobs_by_owner()
            if operator.probe("/healthz") != 200:
                outcome, when = "unhealthy", time.monotonic() - t0
            elif jobs["in-the-dark"] and jobs["after-dark"]:
                outcome, when = "recovered", time.monotonic() - t1
            time.sleep(1)
        assert outcome, (
            f"frozen: {held} connections silenced for {hole_s:.0f} s, then {RECOVER_S:.0f} s of network, "
            f"and /healthz still 200 with no Job for the new FineTuneJobs\n{operator.tail()}"
        )
        print(f"[faults] black hole of {hole_s:.0f} s over {held} connections: {outcome} after {when:.0f} s")
        if outcome == "unhealthy":
            operator.kill()  # the kubelet's liveness probe restarts the container; the test plays it
            operator.start()
        everything = ["steady", "in-the-dark", "after-dark"]
        api.wait_succeeded(everything, operator, timeout=120)
        api.assert_one_job_each(everything)
