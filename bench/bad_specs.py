"""The bad-spec table in a real cluster, with the operator running: what happens to each bad object.

Every case of the invalid-spec table (tests/test_invalid.py `CASES`, each a mutation of `BASE`) is
applied with kubectl as its own FineTuneJob, and so is a class of raw bytes (broken YAML, an alias
bomb, nesting past kubectl's limit, a document over the API server's request limit, a token as a
key or under `!!binary`, wrong scalar types). Each object is either refused at admission (by kubectl or
the API server, whose message is shown) or admitted; an admitted one must get a condition from the
operator (Failed=True or Valid=False) whose message names the field. Then:

- no Job, Pod, PersistentVolumeClaim, ConfigMap or Service exists in the namespace (no orphans), and
  none after every FineTuneJob is deleted;
- no hot loop: the operator's API requests and reconciles (its /metrics) stay flat over a quiet window;
- the operator (`kubetune operator`, a process of its own) stayed up: same process, /healthz always
  200, no traceback or failed reconcile in its log;
- no token appears in any status, event or operator log line.

It needs a control plane. `.venv/bin/python bench/bad_specs.py` starts one from the e2e binaries
(tests/e2e/controlplane.py; built once with `hack/controlplane/controlplane.sh build`) and stops it at
the end; `--kubeconfig FILE` uses an existing cluster with the CRD installed (a namespace is created
and deleted). Not part of `make bench`, which needs no cluster. tests/e2e/test_bad_specs.py runs it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "src", ROOT / "tests", ROOT / "tests" / "e2e"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from kubetune.redact import redact  # noqa: E402

CRD = ROOT / "manifests" / "crd" / "kubetune.io_finetunejobs.yaml"
SECRET_TOKEN = "hf_" + "BenchSecretNeverLeaks0123456789"  # the Hub token Secret's (fake) value
RAW_TOKEN = "hf_" + "RawBytesNeverLeak0123456789abc"
CHILD_KINDS = ("jobs", "pods", "persistentvolumeclaims", "configmaps", "services")
BUILTIN_CONFIGMAPS = {"kube-root-ca.crt"}
QUIET_SECONDS = 10.0
QUIET_MAX_REQUESTS = 2  # a watch may be re-opened in a window; a hot loop makes dozens
CONDITION_TIMEOUT = 90.0


# ---------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # "table" (a mutation of BASE) or "raw" (bytes as they are)
    name: str  # the object's metadata.name (the bad one, when the name is the case)
    field: str  # the field the case is about
    data: bytes  # what kubectl reads on stdin
    fragment: str = ""  # the message the models give (table cases)


def object_name(case_id: str, prefix: str = "bad-") -> str:
    """`bad-<id>` as a DNS label: lowercase, [a-z0-9-], at most 40 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", case_id.lower()).strip("-")
    return (prefix + slug)[:40].rstrip("-")


def _dump(doc: Any) -> bytes:
    try:
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()
    except yaml.YAMLError:
        return json.dumps(doc, default=str).encode()


def table_cases(namespace: str) -> list[Case]:
    """The invalid-spec table, each case as its own object. The name is set before the mutation, so a
    case about the name keeps its bad one."""
    from test_invalid import BASE, CASES

    out, taken = [], set()
    for case_id, mutate, path, fragment in CASES:
        name = object_name(case_id)
        while name in taken:
            name = name[:36] + "-" + secrets.token_hex(1)
        taken.add(name)
        doc = copy.deepcopy(BASE)
        doc["metadata"]["name"] = name
        doc["metadata"]["namespace"] = namespace
        mutate(doc)
        final = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        out.append(Case(case_id, "table", str(final or name), path, _dump(doc), fragment))
    return out


def raw_cases(namespace: str) -> list[Case]:
    """Bytes that kubectl or the API server must refuse, and a token kubectl decodes from `!!binary`.

    (Bytes that kubectl turns into a valid object, such as Latin-1 or UTF-16 text, duplicate keys, a
    `!!float 500` for an integer or a NUL in a string, are `kubetune validate`'s to refuse: in the
    cluster they are valid objects, not bad ones.)"""
    from test_invalid import BASE

    def doc(case_id: str) -> tuple[str, str]:
        name = object_name(case_id, "raw-")
        d = copy.deepcopy(BASE)
        d["metadata"].update(name=name, namespace=namespace)
        return name, yaml.safe_dump(d, sort_keys=False)

    def header(name: str) -> str:
        return (
            "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        )

    cases: list[Case] = []

    def add(case_id: str, path: str, make: Callable[[str, str], str | bytes]) -> None:
        name, text = doc(case_id)
        data = make(name, text)
        cases.append(Case(case_id, "raw", name, path, data.encode() if isinstance(data, str) else data))

    add("broken-yaml", "<yaml>", lambda n, _: header(n) + "spec: [unclosed\n")
    add("empty-document", "<document>", lambda n, _: "")
    add("not-a-mapping", "<document>", lambda n, _: "- FineTuneJob\n- " + n + "\n")
    add("wrong-kind", "kind", lambda n, t: t.replace("kind: FineTuneJob", "kind: FineTuneJobs", 1))
    bomb = "".join(
        f"    {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
    )
    add(
        "alias-bomb",
        "spec.samples",
        lambda n, _: header(n) + "spec:\n  samples:\n    a: &a [lol, lol]\n" + bomb,
    )
    deep = "[" * 20000 + "]" * 20000
    add(
        "nesting-past-kubectl", "spec.samples.prompts", lambda n, t: t.replace("  - Hello\n", f"  - {deep}\n")
    )
    shallow = "[" * 1000 + "]" * 1000
    add("nesting-1000", "spec.samples.prompts[0]", lambda n, t: t.replace("  - Hello\n", f"  - {shallow}\n"))
    big = "x" * (3 * 1024 * 1024 + 64)
    add("over-request-limit", "<document>", lambda n, t: t.replace("  - Hello\n", f"  - {big}\n"))
    add(
        "bool-for-integer",
        "spec.training.maxSteps",
        lambda n, t: t.replace("maxSteps: 500", "maxSteps: true"),
    )
    add(
        "quoted-integer", "spec.training.maxSteps", lambda n, t: t.replace("maxSteps: 500", 'maxSteps: "500"')
    )
    add(
        "timestamp-for-integer",
        "spec.training.maxSteps",
        lambda n, t: t.replace("maxSteps: 500", "maxSteps: 2001-12-14"),
    )
    add(
        "token-as-key",
        "spec.training",
        lambda n, t: t.replace("  training:\n", f"  training:\n    {RAW_TOKEN}: 1\n", 1),
    )
    binary = base64.b64encode(RAW_TOKEN.encode()).decode()
    add(
        "binary-token",
        "spec.samples.prompts[0]",
        lambda n, t: t.replace("  - Hello\n", f"  - !!binary {binary}\n"),
    )
    return cases


# ---------------------------------------------------------------------------------------------------
# The cluster and the operator
# ---------------------------------------------------------------------------------------------------


@dataclass
class Kubectl:
    binary: Path | str
    kubeconfig: Path

    @classmethod
    def of(cls, control_plane: Any) -> Kubectl:
        """From tests/e2e/controlplane.py's ControlPlane."""
        return cls(control_plane.bin / "kubectl", Path(control_plane.kubeconfig))

    def __call__(
        self, *args: str, data: bytes | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        return subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args],
            input=data if data is not None else b"",
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def json(self, *args: str) -> Any:
        proc = self(*args, "-o", "json")
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.decode(errors='replace')}")
        return json.loads(proc.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()
    except OSError:
        return 0, ""


class OperatorProcess:
    """`kubetune operator` for one namespace, as its own process, with /healthz watched throughout."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path) -> None:
        self.health, self.metrics = _free_port(), _free_port()
        self.log_path = log_path
        self._log = log_path.open("wb")
        cmd = [sys.executable, "-m", "kubetune.cli", "operator", f"--kubeconfig={kubeconfig}"]
        cmd += [f"--namespace={namespace}", "--log-format=json", "--workers=4"]
        cmd += [f"--health-addr=127.0.0.1:{self.health}", f"--metrics-addr=127.0.0.1:{self.metrics}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_PROXY": "127.0.0.1,localhost"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid
        self.health_checks = 0
        self.health_failures: list[str] = []
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._probe, name="bench-healthz", daemon=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while _get(f"http://127.0.0.1:{self.health}/readyz")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not become ready:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        self._watch.start()

    def _probe(self) -> None:
        while not self._stop.wait(0.5):
            self.health_checks += 1
            code, _ = _get(f"http://127.0.0.1:{self.health}/healthz")
            if code != 200:
                self.health_failures.append(f"{time.strftime('%H:%M:%S')} /healthz {code}")

    def counters(self) -> tuple[float, float]:
        """(API requests, reconcile passes) from /metrics."""
        code, text = _get(f"http://127.0.0.1:{self.metrics}/metrics")
        if code != 200:
            raise RuntimeError(f"/metrics answered {code}")
        requests = reconciles = 0.0
        for line in text.splitlines():
            if line.startswith("kubetune_api_requests_total{"):  # by verb and resource
                requests += float(line.split()[-1])
            elif line.startswith("kubetune_reconciles_total{"):
                reconciles += float(line.split()[-1])
        return requests, reconciles

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    refused_by: str | None = None  # "kubectl" or "API server"; None when admitted
    message: str = ""  # redacted: kubectl's or the API server's words, or the operator's condition
    reason: str = ""  # the condition's reason (admitted objects)
    state: str = ""
    echoed_token: bool = False  # the refusal repeated a token (shown here redacted)

    @property
    def admitted(self) -> bool:
        return self.refused_by is None

    @property
    def names_field(self) -> bool:
        return names_field(self.case.field, self.message)


def names_field(path: str, message: str) -> bool:
    """The message names the field: its whole path, or its last part (a CEL rule names its own).
    `<yaml>` and `<document>` name no field: any message will do."""
    if path.startswith("<"):
        return True
    leaf = path.rsplit(".", 1)[-1].split("[")[0]
    return path in message or (bool(leaf) and leaf in message)


@dataclass
class Summary:
    outcomes: list[Outcome]
    orphans: dict[str, list[str]]  # kind -> names, after the conditions were set
    orphans_after_delete: dict[str, list[str]]
    quiet_seconds: float
    quiet_requests: float
    quiet_reconciles: float
    operator_alive: bool
    operator_restarts: int
    health_checks: int
    health_failures: list[str]
    log_problems: list[str]  # tracebacks, failed reconciles, logging errors
    requests: float  # the operator's API requests, from ready to the quiet window's end
    reconciles: float
    leaks: list[str]  # where a token was found
    elapsed: float
    problems: list[str] = field(default_factory=list)

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.admitted]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.admitted and o.reason]

    @property
    def slipped(self) -> list[Outcome]:
        """Admitted, and no failure condition: what the bench exists to catch."""
        return [o for o in self.outcomes if o.admitted and not o.reason]

    def check(self) -> list[str]:
        problems = [
            f"{o.case.id}: admitted, and no failure condition (state {o.state!r})" for o in self.slipped
        ]
        problems += [
            f"{o.case.id}: the condition does not name {o.case.field}: {o.message}"
            for o in self.failed
            if not o.names_field
        ]
        for label, found in (("orphans", self.orphans), ("orphans after delete", self.orphans_after_delete)):
            problems += [f"{label}: {kind} {names}" for kind, names in found.items() if names]
        if self.quiet_requests > QUIET_MAX_REQUESTS:
            problems.append(f"hot loop: {self.quiet_requests:.0f} API requests in {self.quiet_seconds:.0f} s")
        if self.quiet_reconciles > QUIET_MAX_REQUESTS:
            problems.append(f"hot loop: {self.quiet_reconciles:.0f} reconciles in {self.quiet_seconds:.0f} s")
        if not self.operator_alive or self.operator_restarts:
            problems.append("the operator did not stay up")
        problems += self.health_failures + self.log_problems + [f"token leaked: {w}" for w in self.leaks]
        self.problems = problems
        return problems

    def table(self) -> str:
        width = max(len(o.case.id) for o in self.outcomes)
        lines = [f"{'case':{width}}  {'kind':5}  outcome", "-" * (width + 60)]
        for o in self.outcomes:
            if o.admitted:
                what = f"admitted -> {o.reason or 'NO CONDITION'}" + (
                    "" if o.names_field else " (field not named)"
                )
            else:
                what = f"refused by {o.refused_by}"
                if o.refused_by == "API server" and not o.names_field:
                    what += " (field not named)"
                if o.echoed_token:
                    what += " (its message repeats the token, masked here)"
            lines.append(f"{o.case.id:{width}}  {o.case.kind:5}  {what}: {_clip(_short(o.message), 160)}")
        return "\n".join(lines)

    def totals(self) -> str:
        orphans = sum(len(v) for v in self.orphans.values())
        after = sum(len(v) for v in self.orphans_after_delete.values())
        table = sum(1 for o in self.outcomes if o.case.kind == "table")
        raw = len(self.outcomes) - table
        healthy = self.health_checks - len(self.health_failures)
        return "\n".join(
            [
                f"cases: {len(self.outcomes)} ({table} from the table, {raw} raw bytes)",
                f"refused at admission: {len(self.refused)} "
                f"(kubectl {sum(o.refused_by == 'kubectl' for o in self.refused)}, "
                f"API server {sum(o.refused_by == 'API server' for o in self.refused)})",
                f"admitted and failed with a condition naming the field: "
                f"{sum(o.names_field for o in self.failed)} of {len(self.failed)} "
                f"({', '.join(sorted({o.reason for o in self.failed})) or '-'})",
                f"admitted without a condition: {len(self.slipped)}",
                f"orphans: {orphans} (after deleting them all: {after})",
                f"operator: {self.requests:.0f} API requests, {self.reconciles:.0f} reconciles in all; "
                f"during a {self.quiet_seconds:.0f} s quiet window: {self.quiet_requests:.0f} requests, "
                f"{self.quiet_reconciles:.0f} reconciles",
                f"operator restarts: {self.operator_restarts}; /healthz {healthy}/{self.health_checks} ok; "
                f"log problems: {len(self.log_problems)}; token leaks: {len(self.leaks)}",
                f"wall time: {self.elapsed:.0f} s",
            ]
        )


# The API server's boilerplate around what it says about the field.
_BOILERPLATE = (
    re.compile(r'error when (?:creating|applying patch:?) "STDIN": '),
    re.compile(r'FineTuneJob in version "\w+" cannot be handled as a FineTuneJob: '),
    re.compile(r'The FineTuneJob "[^"]*" is invalid: '),
    re.compile(r"\* <nil>: Invalid value: null: some validation rules were not checked[^\n]*"),
    re.compile(r"^error: "),
)


def _short(message: str) -> str:
    for pattern in _BOILERPLATE:
        message = pattern.sub("", message)
    return message


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _refusal(proc: subprocess.CompletedProcess[bytes]) -> tuple[str, str]:
    """(who refused, their words, redacted): the API server's answers start `Error from server` or
    `The <Kind> "<name>" is invalid`; anything else is kubectl's own."""
    text = redact(proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace"))
    by_server = text.startswith(("Error from server", "The FineTuneJob")) or "is invalid:" in text
    return ("API server" if by_server else "kubectl"), text


def _failure_condition(obj: dict[str, Any]) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if (c.get("type") == "Failed" and c.get("status") == "True") or (
            c.get("type") == "Valid" and c.get("status") == "False"
        ):
            return dict(c)
    return None


def children(kubectl: Kubectl, namespace: str) -> dict[str, list[str]]:
    """Every object of the kinds the operator creates, in the namespace (but the built-in ConfigMap)."""
    found = {}
    for kind in CHILD_KINDS:
        items = kubectl.json("get", kind, "-n", namespace)["items"]
        names = sorted(i["metadata"]["name"] for i in items)
        found[kind] = [n for n in names if not (kind == "configmaps" and n in BUILTIN_CONFIGMAPS)]
    return found


def _settle(check: Callable[[], bool], timeout: float, interval: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _tokens() -> list[str]:
    from test_invalid import FAKE_TOKEN

    return [SECRET_TOKEN, RAW_TOKEN, FAKE_TOKEN]


def run(
    kubectl: Kubectl,
    namespace: str,
    *,
    quiet_seconds: float = QUIET_SECONDS,
    workdir: Path | None = None,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> Summary:
    """Apply every case in `namespace` (which must exist, with the CRD installed) with a fresh operator
    watching it; check and return what happened."""
    start = time.monotonic()
    kubectl(
        "create", "secret", "generic", "hf-token", "-n", namespace, f"--from-literal=token={SECRET_TOKEN}"
    )
    work = workdir or Path(tempfile.mkdtemp(prefix="kubetune-bad-specs-"))
    operator = OperatorProcess(kubectl.kubeconfig, namespace, work / "operator.log")
    try:
        operator.wait_ready()
        requests_ready, reconciles_ready = operator.counters()
        cases = table_cases(namespace) + raw_cases(namespace)
        say(f"applying {len(cases)} bad objects in namespace {namespace}")
        outcomes = []
        for case in cases:
            proc = kubectl("apply", "-n", namespace, "-f", "-", data=case.data)
            outcome = Outcome(case)
            if proc.returncode != 0:
                outcome.refused_by, outcome.message = _refusal(proc)
                outcome.echoed_token = any(t.encode() in proc.stderr + proc.stdout for t in _tokens())
            outcomes.append(outcome)
        admitted = {o.case.name: o for o in outcomes if o.admitted}
        say(f"{len(admitted)} admitted; waiting for the operator's conditions")

        def conditioned() -> bool:
            for obj in kubectl.json("get", "finetunejobs", "-n", namespace)["items"]:
                outcome = admitted.get(obj["metadata"]["name"])
                if outcome is None:
                    continue
                status = obj.get("status") or {}
                outcome.state = str(status.get("state") or "")
                failure = _failure_condition(obj)
                if failure is not None:
                    outcome.reason, outcome.message = str(failure.get("reason")), str(failure.get("message"))
            return all(o.reason for o in admitted.values())

        _settle(conditioned, CONDITION_TIMEOUT)
        _settle(lambda: not any(children(kubectl, namespace).values()), 30.0)
        orphans = children(kubectl, namespace)
        time.sleep(2.0)  # the last status writes' watch events come back: let them pass
        say(f"quiet window of {quiet_seconds:.0f} s")
        requests_before, reconciles_before = operator.counters()
        time.sleep(quiet_seconds)
        requests_after, reconciles_after = operator.counters()

        statuses = kubectl.json("get", "finetunejobs", "-n", namespace)["items"]
        events = kubectl.json("get", "events", "-n", namespace)["items"]
        kubectl(
            "delete", "finetunejobs", "--all", "-n", namespace, "--wait=true", "--timeout=120s", timeout=150
        )
        _settle(lambda: not any(children(kubectl, namespace).values()), 60.0)
        after = children(kubectl, namespace)
        alive = operator.alive()
    finally:
        operator.stop()
    log = operator.log()
    log_problems = [
        f"operator log: {_clip(line, 200)}"
        for line in log.splitlines()
        if any(bad in line for bad in ("Traceback", "reconcile failed", "Logging error"))
    ]
    texts = {
        "operator log": log,
        "FineTuneJob statuses": json.dumps([o.get("status") for o in statuses]),
        "events": json.dumps([(e.get("reason"), e.get("message")) for e in events]),
        "bench output": json.dumps([o.message for o in outcomes]),
    }
    leaks = [where for where, text in texts.items() for token in _tokens() if token in text]
    summary = Summary(
        outcomes=outcomes,
        orphans=orphans,
        orphans_after_delete=after,
        quiet_seconds=quiet_seconds,
        quiet_requests=requests_after - requests_before,
        quiet_reconciles=reconciles_after - reconciles_before,
        operator_alive=alive,
        operator_restarts=0 if alive and operator.proc.pid == operator.pid else 1,
        health_checks=operator.health_checks,
        health_failures=operator.health_failures,
        log_problems=log_problems,
        requests=requests_after - requests_ready,
        reconciles=reconciles_after - reconciles_ready,
        leaks=leaks,
        elapsed=time.monotonic() - start,
    )
    summary.check()
    if workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return summary


# ---------------------------------------------------------------------------------------------------
# As a script
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def control_plane() -> Iterator[Kubectl]:
    """A control plane of the e2e binaries, with the CRD installed, for the length of the run."""
    import controlplane

    controlplane.build()
    directory = Path(tempfile.mkdtemp(prefix="kubetune-bad-specs-cp-"))
    cp = controlplane.start(directory, owner_pid=os.getpid())
    try:
        kubectl = Kubectl.of(cp)
        _install_crd(kubectl)
        yield kubectl
    finally:
        controlplane.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


def _install_crd(kubectl: Kubectl) -> None:
    for args in (
        ("apply", "--server-side", "-f", str(CRD)),
        ("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io"),
    ):
        proc = kubectl(*args)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.decode(errors='replace')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kubeconfig", type=Path, help="an existing cluster with the CRD (default: start one)"
    )
    parser.add_argument("--kubectl", default=shutil.which("kubectl") or "kubectl", help="with --kubeconfig")
    parser.add_argument("--quiet-seconds", type=float, default=QUIET_SECONDS)
    parser.add_argument("--table-only", action="store_true", help="print only the summary lines")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.kubeconfig:
            kubectl = Kubectl(args.kubectl, args.kubeconfig)
        else:
            kubectl = stack.enter_context(control_plane())
        namespace = f"bad-specs-{secrets.token_hex(3)}"
        created = kubectl("create", "namespace", namespace)
        if created.returncode != 0:
            raise SystemExit(
                f"cannot create namespace {namespace}: {created.stderr.decode(errors='replace')}"
            )
        try:
            summary = run(kubectl, namespace, quiet_seconds=args.quiet_seconds)
        finally:
            kubectl("delete", "namespace", namespace, "--wait=false")
    if not args.table_only:
        print(summary.table())
        print()
    print(summary.totals())
    for problem in summary.problems:
        print(f"PROBLEM: {problem}")
    return 1 if summary.problems else 0


if __name__ == "__main__":
    sys.exit(main())
