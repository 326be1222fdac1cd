"""`kubetune operator` start-up errors: one line naming the flag (and the port), exit code 2, no traceback,
and before any request to a cluster (the kubeconfig here points at a port nothing listens on)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("kubernetes")  # the operator extra

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: nowhere, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: nobody, user: {token: not-a-token}}]
contexts: [{name: nowhere, context: {cluster: nowhere, user: nobody}}]
current-context: nowhere
"""


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port this test listens on for as long as it runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def operator(kubeconfig: Path, *args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "operator", f"--kubeconfig={kubeconfig}", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output and "OSError" not in output, output
    return lines[0]


@pytest.mark.parametrize("flag", ["--health-addr", "--metrics-addr"])
def test_a_busy_port_is_one_line_and_exit_2(kubeconfig: Path, busy_port: int, flag: str) -> None:
    other = "--metrics-addr" if flag == "--health-addr" else "--health-addr"
    code, output, took = operator(kubeconfig, f"{flag}=127.0.0.1:{busy_port}", f"{other}=127.0.0.1:0")
    assert code == 2, output
    line = one_line(output)
    assert f"{flag} 127.0.0.1:{busy_port}: port {busy_port} is already in use" in line, line
    assert "pick another port" in line
    # It never waited on the cluster (nothing listens at 127.0.0.1:1, and it would retry for ever).
    assert took < 30


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--health-addr=8080"], "--health-addr '8080': expected HOST:PORT"),
        (["--metrics-addr=0.0.0.0:http"], "--metrics-addr '0.0.0.0:http': expected HOST:PORT"),
        (["--health-addr=127.0.0.1:70000"], "--health-addr '127.0.0.1:70000': expected HOST:PORT"),
        (
            ["--health-addr=no-such-host.invalid:8080"],
            "--health-addr no-such-host.invalid:8080: cannot resolve host",
        ),
        (
            ["--health-addr=127.0.0.1:18080", "--metrics-addr=0.0.0.0:18080"],
            "--metrics-addr 0.0.0.0:18080 and --health-addr 127.0.0.1:18080 use the same port 18080",
        ),
        (
            ["--policy-configmap=kubetune-policy"],
            "--policy-configmap 'kubetune-policy': expected NAMESPACE/NAME",
        ),
        (["--leader-elect"], "--leader-elect needs --leader-election-namespace"),
    ],
    ids=["no-port", "named-port", "port-range", "unresolvable", "same-port", "policy-ref", "lease-namespace"],
)
def test_bad_flags_are_one_line_and_exit_2(
    kubeconfig: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str
) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    code, output, _ = operator(kubeconfig, *args)
    assert code == 2, output
    assert expected in one_line(output)


def test_a_kubeconfig_that_does_not_load_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    code, output, _ = operator(broken, "--health-addr=127.0.0.1:0")
    assert code == 2, output
    assert f"cannot load the cluster credentials from --kubeconfig {broken}" in one_line(output)
