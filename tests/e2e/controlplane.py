"""A real Kubernetes control plane for the end-to-end tests, driven through hack/controlplane/controlplane.sh.

`controlplane.sh build` compiles etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and
kwok from the Go module proxy into a cache outside the repository (about 10 minutes cold, a no-op after);
`controlplane.sh start DIR` runs them on loopback ports in seconds, with fake GPU nodes played by kwok.
Everything here talks to the cluster through the real kubectl, which needs no Python dependency.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "controlplane" / "controlplane.sh"

# A cold build of every binary takes about 10 minutes on 2 cores; give it plenty, but not forever.
BUILD_TIMEOUT_S = float(os.environ.get("KUBETUNE_E2E_BUILD_TIMEOUT", 3 * 3600))
START_TIMEOUT_S = 180.0
KUBECTL_TIMEOUT_S = 60.0

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or used."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Never send loopback traffic through a proxy the machine may configure.
    for key in ("NO_PROXY", "no_proxy"):
        extra = "127.0.0.1,localhost"
        env[key] = f"{env[key]},{extra}" if env.get(key) else extra
    return env


def _run_script(
    *args: str, timeout: float, env: Mapping[str, str] | None = None, script: Path = SCRIPT
) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(script), *args]
    try:
        return subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**_env(), **(env or {})},
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise ControlPlaneError(f"{shlex.join(cmd)} timed out after {timeout:.0f} s\n{out}{err}") from e


# kubelet: the real node's (tests/e2e/node.py), built with the rest.
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "kwok",
)


def is_built() -> bool:
    directory = bin_dir()
    return all(os.access(directory / b, os.X_OK) for b in BINARIES)


def build(*, stream: bool = False) -> Path:
    """Build (or find cached) binaries; returns the directory that holds them.

    stream=True lets the build's progress through to the terminal (a cold build takes minutes).
    """
    cmd = ["bash", str(SCRIPT), "build"]
    hint = "it needs Go >= 1.26 (GO=/path/to/go) and the Go module proxy"
    if stream:
        try:
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, env=_env(), timeout=BUILD_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired as e:
            raise ControlPlaneError(f"{shlex.join(cmd)} timed out after {BUILD_TIMEOUT_S:.0f} s") from e
        if rc != 0:
            raise ControlPlaneError(
                f"`{SCRIPT.relative_to(ROOT)} build` failed (exit {rc}, output above); {hint}"
            )
    else:
        proc = _run_script("build", timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise ControlPlaneError(
                f"`{SCRIPT.relative_to(ROOT)} build` failed (exit {proc.returncode}); {hint}\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )
    return bin_dir()


def bin_dir() -> Path:
    proc = _run_script("bin-dir", timeout=60)
    if proc.returncode != 0:
        raise ControlPlaneError(f"`controlplane.sh bin-dir` failed:\n{proc.stderr}")
    return Path(proc.stdout.strip())


def start(directory: Path, *, owner_pid: int | None = None) -> ControlPlane:
    """Start a control plane in `directory`; with owner_pid, it stops by itself once that process is
    gone (a test run killed before its teardown leaves nothing running)."""
    owner = {"CONTROLPLANE_OWNER_PID": str(owner_pid)} if owner_pid else {}
    proc = _run_script("start", str(directory), timeout=START_TIMEOUT_S, env=owner)
    if proc.returncode != 0:
        # The script stops what it started when it fails by itself; after our timeout it may not have.
        stop(directory)
        raise ControlPlaneError(
            f"`controlplane.sh start` failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}"
        )
    env = dict(line.split("=", 1) for line in (directory / "env").read_text().splitlines() if "=" in line)
    return ControlPlane(
        dir=directory,
        bin=Path(env["bin"]),
        kubeconfig=directory / "kubeconfig",
        server=env["server"],
        ca_file=Path(env["ca"]),
        version=env["kubernetes"],
        start_log=proc.stderr,
    )


def stop(directory: Path) -> None:
    _run_script("stop", str(directory), timeout=120)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def poll(
    fn: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
) -> T:
    """Call fn until it returns something truthy (and return that), or fail after `timeout` seconds.

    fn may raise AssertionError to say "not yet" with a reason; the last reason is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = fn()
        except AssertionError as e:
            result, last = None, e
        else:
            last = result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)


@dataclass
class ControlPlane:
    dir: Path
    bin: Path
    kubeconfig: Path
    server: str
    ca_file: Path
    version: str
    start_log: str = field(default="", repr=False)

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = False,
        timeout: float = KUBECTL_TIMEOUT_S,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the control plane's own kubectl as cluster admin (or with `kubeconfig`)."""
        cmd = [str(self.bin / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(
            cmd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(),
            check=False,
        )
        if check and proc.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {shlex.join(args)} failed (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )
        return proc

    def get(self, *args: str) -> Any:
        """`kubectl get ARGS -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json", check=True).stdout)

    def apply(self, *objects: Mapping[str, Any], namespace: str | None = None) -> None:
        """Apply objects given as dicts (JSON is YAML)."""
        doc = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
        ns = [f"--namespace={namespace}"] if namespace else []
        self.kubectl("apply", *ns, "-f", "-", input=json.dumps(doc), check=True)

    @property
    def port(self) -> int:
        """The API server's port on 127.0.0.1."""
        return int(self.server.rsplit(":", 1)[1])

    def restart(self, component: str, timeout: float = START_TIMEOUT_S) -> None:
        """Stop one component (SIGTERM, SIGKILL after 10 s) and start it again with the same flags,
        port and certificates; for kube-apiserver and etcd, return once it serves again."""
        proc = _run_script("restart", str(self.dir), component, timeout=timeout)
        if proc.returncode != 0:
            raise ControlPlaneError(
                f"`controlplane.sh restart {component}` failed (exit {proc.returncode}):\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )

    def restart_apiserver(self, timeout: float = START_TIMEOUT_S) -> None:
        self.restart("kube-apiserver", timeout)

    def kubeconfig_via(self, server: str, path: Path, *, source: Path | None = None) -> Path:
        """A copy of the admin kubeconfig (or `source`) whose server is `server`, e.g. a relay on
        127.0.0.1 in front of the API server: the serving certificate covers 127.0.0.1."""
        doc = json.loads(
            self.kubectl(
                "config", "view", "--raw", "-o", "json", kubeconfig=source or self.kubeconfig, check=True
            ).stdout
        )
        for cluster in doc["clusters"]:
            cluster["cluster"]["server"] = server
        path.write_text(json.dumps(doc))
        path.chmod(0o600)
        return path

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        """Write a kubeconfig that authenticates with a bearer token only (no client certificate)."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "e2e",
                            "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                        }
                    ],
                    "users": [{"name": "token", "user": {"token": token}}],
                    "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "token"}}],
                    "current-context": "e2e",
                }
            )
        )
        path.chmod(0o600)
        return path

    def wait_for_condition(
        self, kind_name: str, condition: str, *, namespace: str, timeout: float = 60, status: str = "True"
    ) -> dict[str, Any]:
        """Poll until the object's status.conditions has type=condition with the given status; return it."""

        def check() -> dict[str, Any] | None:
            obj: dict[str, Any] = self.get(kind_name, f"--namespace={namespace}")
            conds = obj.get("status", {}).get("conditions") or []
            for c in conds:
                if c.get("type") == condition and c.get("status") == status:
                    return obj
            raise AssertionError(
                f"{kind_name} conditions: {[(c.get('type'), c.get('status')) for c in conds]}"
            )

        return poll(check, timeout=timeout, what=f"{kind_name} {condition}={status}")

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.get("pods", f"--namespace={namespace}", f"--selector={selector}")[
            "items"
        ]
        return items

    def dump(self, namespaces: Iterable[str] = ()) -> str:
        """Cluster state and component log tails, for failure messages."""
        parts = [self.kubectl("get", "nodes,pods,jobs", "-A", "-o", "wide").stdout]
        for ns in namespaces:
            parts.append(
                self.kubectl("get", "events", f"--namespace={ns}", "--sort-by=.lastTimestamp").stdout
            )
        for log in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {log.name}\n{_tail(log.read_text(errors='replace'), 20)}")
        return "\n".join(parts)
